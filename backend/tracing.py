"""OpenTelemetry tracing: a span per Generate and per adapter operation.

Spans continue the caller's W3C ``traceparent`` (gRPC metadata) and carry the
GenAI semantic-convention attributes. Export is off unless the standard
variables turn it on, read when the server starts (never at import):

- ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``: off;
- ``OTEL_TRACES_EXPORTER=otlp`` or ``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT`` set: OTLP over gRPC
  (the exporter reads its own ``OTEL_EXPORTER_OTLP_*`` settings);
- ``OTEL_TRACES_EXPORTER=console``: spans printed to stdout.

Tests pass their own exporter (e.g. ``InMemorySpanExporter``) to ``configure_tracing``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.outputs import RequestOutput

log = logging.getLogger("loraplex.tracing")
TRACER_NAME = "loraplex"
PROVIDER_NAME = "loraplex"  # gen_ai.provider.name, as on the gateway's spans (a test keeps them equal)
_PROPAGATOR = TraceContextTextMapPropagator()


def configure_tracing(exporter: SpanExporter | None = None,
                      environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A tracer provider exporting to ``exporter``, or to what ``OTEL_*`` asks for; None when off."""
    env = os.environ if environ is None else environ
    if exporter is not None:
        provider = TracerProvider(resource=_resource(env))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    exporter = _exporter_from_env(env)
    if exporter is None:
        return None
    provider = TracerProvider(resource=_resource(env))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on: exporting spans with %s", type(exporter).__name__)
    return provider


def _exporter_from_env(env: Mapping[str, str]) -> SpanExporter | None:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    kind = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if kind in ("none", ""):
        has_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if kind == "none" or not has_endpoint:
            return None
        kind = "otlp"
    if kind == "console":
        return ConsoleSpanExporter()
    if kind != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%r is not supported (otlp, console, none); tracing off", kind)
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _resource(env: Mapping[str, str]) -> Resource:
    """OTEL_SERVICE_NAME, else a service.name in OTEL_RESOURCE_ATTRIBUTES, else "loraplex"."""
    if env.get("OTEL_SERVICE_NAME"):
        return Resource.create({"service.name": env["OTEL_SERVICE_NAME"]})
    if "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        return Resource.create()
    return Resource.create({"service.name": "loraplex"})


def get_tracer(provider: TracerProvider | None) -> trace.Tracer:
    """The provider's tracer, or a no-op one when tracing is off."""
    if provider is None:
        return trace.NoOpTracer()
    return provider.get_tracer(TRACER_NAME)


def extract_context(metadata: Iterable[tuple[str, Any]] | None) -> Context:
    """The caller's trace context from gRPC metadata (``traceparent`` / ``tracestate``)."""
    carrier = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    return _PROPAGATOR.extract(carrier)


def monotonic_to_ns(t: float) -> int:
    """Wall-clock nanoseconds of a ``time.monotonic()`` instant (span event timestamps)."""
    return time.time_ns() - int((time.monotonic() - t) * 1e9)


def request_attributes(req: EngineRequest, operation: str, model: str) -> dict[str, Any]:
    """GenAI attributes known when the request arrives."""
    p = req.params
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": PROVIDER_NAME,
        "gen_ai.request.model": req.adapter or model,
        "gen_ai.request.temperature": p.temperature,
        "gen_ai.request.top_p": p.top_p,
        "gen_ai.response.id": req.request_id,
        "loraplex.request.id": req.request_id,
        "loraplex.adapter": req.adapter or "",
    }
    if p.max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = p.max_tokens
    if p.top_k:
        attrs["gen_ai.request.top_k"] = p.top_k
    if p.seed is not None:
        attrs["gen_ai.request.seed"] = p.seed
    return attrs


class GenerateSpanRecorder:
    """Adds a Generate span's milestone events and final attributes from the engine's deltas."""

    def __init__(self, span: trace.Span, model: str) -> None:
        self.span = span
        self.model = model  # the model asked for: the adapter's name, or the base model's
        self._first_output = True
        self._first_token = True

    def on_output(self, out: RequestOutput) -> None:
        t = out.timings
        if self._first_output:
            self._first_output = False
            if t.arrival:
                self.span.add_event("queued", timestamp=monotonic_to_ns(t.arrival))
            if out.adapter is not None or out.adapter_version:
                self.span.add_event("adapter_ready", {"loraplex.adapter": out.adapter or "",
                                                      "loraplex.adapter.version": out.adapter_version or 0})
            if t.first_scheduled:
                self.span.add_event("prefill", timestamp=monotonic_to_ns(t.first_scheduled))
        if out.new_token_ids and self._first_token:
            self._first_token = False
            stamp = monotonic_to_ns(t.first_token) if t.first_token else None
            self.span.add_event("first_token", timestamp=stamp)
        if out.finished:
            self._finish(out)

    def _finish(self, out: RequestOutput) -> None:
        reason = out.finish_reason or "stop"
        self.span.add_event("finish", {"gen_ai.response.finish_reasons": [reason]})
        self.span.set_attributes({
            "gen_ai.response.finish_reasons": [reason],
            "gen_ai.response.model": out.adapter or self.model,
            "gen_ai.usage.input_tokens": out.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": out.usage.completion_tokens,
            "loraplex.usage.cached_tokens": out.usage.cached_tokens,
            "loraplex.queue_time_seconds": out.timings.queue_time,
            "loraplex.time_to_first_token_seconds": out.timings.time_to_first_token,
        })
        if out.adapter_version:
            self.span.set_attribute("loraplex.adapter.version", out.adapter_version)
        if out.error:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, out.error))
