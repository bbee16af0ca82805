"""Trace context: one SERVER span per request, continuing the caller's ``traceparent``
(or starting a trace), passed on in the metadata of every gRPC call it makes, so the
backend's span is its child. Export follows the standard ``OTEL_*`` variables, read once at start:

- ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``: off;
- ``OTEL_TRACES_EXPORTER=otlp`` or ``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT`` set: OTLP over gRPC
  (the exporter reads its own ``OTEL_EXPORTER_OTLP_*`` settings);
- ``OTEL_TRACES_EXPORTER=console``: spans printed to stdout;
- ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` name the service (default ``loraplex-gateway``).

When a server span is already current (an auto-instrumentation wrapped the app), the request span
becomes its child instead of a second trace.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider

SERVICE_NAME = "loraplex-gateway"
PROVIDER_NAME = "loraplex"
AttributeValue = str | int | float | bool | Sequence[str]


class RequestSpan:
    """One request's span; ``metadata`` carries its context to the backend."""

    def __init__(self, tracer: Tracer, name: str, headers: Mapping[str, str]) -> None:
        current = trace.get_current_span()
        if current.get_span_context().is_valid and current.is_recording():
            parent, kind = None, SpanKind.INTERNAL  # an instrumentation's server span is already the root
        else:
            parent, kind = propagate.extract(dict(headers)), SpanKind.SERVER
        self.span = tracer.start_span(name, context=parent, kind=kind)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span, parent))
        self.metadata: list[tuple[str, str]] = sorted(carrier.items())
        self._ended = False

    def set(self, key: str, value: AttributeValue) -> None:
        self.span.set_attribute(key, value)

    def end(self, http_status: int = 200, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self.span.set_attribute("http.response.status_code", http_status)
        if error is not None or http_status >= 500:
            self.span.set_attribute("error.type", str(http_status))
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


def get_tracer(provider: TracerProvider | None = None) -> Tracer:
    return trace.get_tracer("loraplex.gateway", tracer_provider=provider)


def setup_tracing(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A tracer provider exporting where ``OTEL_*`` says, or None when tracing is off; says which on
    stderr once. Called by the CLI at start, never on import."""
    env = os.environ if environ is None else environ
    exporter, where = _exporter_from_env(env)
    if exporter is None:
        _say(f"tracing off ({where}); trace context is still passed to the backend")
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": _service_name(env)} if _service_name(env) else {})
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _say(f"tracing on: spans of service {resource.attributes.get('service.name')!s} go to {where}")
    return provider


def _service_name(env: Mapping[str, str]) -> str | None:
    """OTEL_SERVICE_NAME, else None when OTEL_RESOURCE_ATTRIBUTES names it (the SDK reads it), else ours."""
    if env.get("OTEL_SERVICE_NAME"):
        return env["OTEL_SERVICE_NAME"]
    return None if "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "") else SERVICE_NAME


def _exporter_from_env(env: Mapping[str, str]) -> tuple[Any, str]:
    """(exporter or None, where spans go or why they do not)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None, "OTEL_SDK_DISABLED=true"
    kind = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if kind == "none":
        return None, "OTEL_TRACES_EXPORTER=none"
    if kind == "":
        if not endpoint:
            return None, "set OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER to export"
        kind = "otlp"
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(), "the console (stdout)"
    if kind != "otlp":
        return None, f"OTEL_TRACES_EXPORTER={kind!r} is not supported: otlp, console or none"
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        return None, "the OTLP exporter is not installed: pip install 'loraplex[gateway]'"
    return OTLPSpanExporter(), f"OTLP/gRPC at {endpoint or 'localhost:4317'}"


def _say(message: str) -> None:
    print(f"loraplex gateway: {message}", file=sys.stderr, flush=True)
