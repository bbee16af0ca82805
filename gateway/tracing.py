"""Trace context: continue the caller's ``traceparent`` (or start a trace) and pass it on.

Each OpenAI request gets a SERVER span; the W3C ``traceparent`` of that span goes into
the metadata of every gRPC call it makes, so the backend's spans join the same trace.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider


class RequestSpan:
    """One request's span; ``metadata`` carries its context to the backend."""

    def __init__(self, tracer: Tracer, name: str, headers: Mapping[str, str]) -> None:
        parent = propagate.extract(dict(headers))
        self.span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span, parent))
        self.metadata: list[tuple[str, str]] = sorted(carrier.items())
        self._ended = False

    def set(self, key: str, value: str | int | float | bool) -> None:
        self.span.set_attribute(key, value)

    def end(self, http_status: int = 200, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self.span.set_attribute("http.response.status_code", http_status)
        if error is not None or http_status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")


def get_tracer(provider: TracerProvider | None = None) -> Tracer:
    return trace.get_tracer("loraplex.gateway", tracer_provider=provider)


def setup_tracing(service_name: str = "loraplex-gateway") -> None:
    """Installs an SDK tracer provider (so traces start here when the caller sends none),
    exporting over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the exporter is installed.
    Called by the CLI at start, never on import."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # the application configured its own
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    provider = SdkTracerProvider(resource=Resource.create({"service.name": service_name}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        _add_otlp_exporter(provider)
    trace.set_tracer_provider(provider)


def _add_otlp_exporter(provider: object) -> None:
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # type: ignore[attr-defined]
