"""Tracing end to end: real ``loraplex serve`` and ``loraplex gateway`` processes export over OTLP
(configured only by the standard ``OTEL_*`` variables) to an in-process receiver built from
``opentelemetry-proto``. One trace per request: the caller's span → the gateway's SERVER span →
the backend's span, with the GenAI attributes on the gateway span."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from e2e_stack import Stack, start_gateway, start_serve
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from loraplex.backend.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME
from loraplex.gateway.tracing import setup_tracing

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(),
                                reason="the demo model's weights are not built")

GATEWAY_SERVICE = "gw-under-test"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps (service name, span) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[tuple[str, trace_pb2.Span]]:
        with self.lock:
            return [(s, span) for s, span in self.spans if span.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Receiver, Path]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100"}
    log_dir = tmp_path_factory.mktemp("traced")
    stack = start_serve(log_dir, env={**otel, "OTEL_SERVICE_NAME": "backend-under-test"})
    try:
        stack.url = start_gateway(stack, log_dir / "gateway.log", env={**otel, "OTEL_SERVICE_NAME": GATEWAY_SERVICE})
        yield stack, receiver, log_dir / "gateway.log"
    finally:
        stack.stop()
        server.stop(0)


def _wait_for_trace(receiver: Receiver, trace_id: str) -> list[tuple[str, trace_pb2.Span]]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = receiver.trace(trace_id)
        services = {s for s, _ in spans}
        if GATEWAY_SERVICE in services and len(services) >= 2:
            return spans
        time.sleep(0.1)
    return receiver.trace(trace_id)


def _attributes(span: trace_pb2.Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        value = getattr(a.value, kind)
        out[a.key] = [getattr(v, v.WhichOneof("value")) for v in value.values] if kind == "array_value" else value
    return out


def test_the_gateway_span_continues_the_callers_trace_and_parents_the_backend_span(
        traced: tuple[Stack, Receiver, Path]) -> None:
    stack, receiver, log = traced
    r = httpx.post(stack.url + "/v1/chat/completions", timeout=60,
                   headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
                   json={"model": "reverse", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    spans = _wait_for_trace(receiver, CALLER_TRACE)
    gateway = [span for service, span in spans if service == GATEWAY_SERVICE]
    backend = [span for service, span in spans if service != GATEWAY_SERVICE]
    assert len(gateway) == 1, [s.name for s in gateway]  # one server span, no second (framework) span
    span = gateway[0]
    assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER and span.parent_span_id.hex() == CALLER_SPAN
    assert backend and all(b.parent_span_id == span.span_id for b in backend), [b.name for b in backend]
    attrs = _attributes(span)
    body = r.json()
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.provider.name"] == "loraplex"
    assert attrs["gen_ai.request.model"] == attrs["gen_ai.response.model"] == "reverse"
    assert attrs["gen_ai.response.id"] == body["id"]
    assert attrs["gen_ai.response.finish_reasons"] == [body["choices"][0]["finish_reason"]]
    assert attrs["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert "tracing on" in log.read_text() and GATEWAY_SERVICE in log.read_text()


def test_a_request_without_traceparent_is_one_trace_rooted_at_the_gateway(
        traced: tuple[Stack, Receiver, Path]) -> None:
    stack, receiver, _ = traced
    before = len(receiver.spans)
    r = httpx.post(stack.url + "/v1/completions", timeout=60,
                   json={"model": DEMO_MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(s == GATEWAY_SERVICE for s, _ in receiver.spans[before:]):
        time.sleep(0.1)
    root = next(span for s, span in receiver.spans[before:] if s == GATEWAY_SERVICE)
    assert not root.parent_span_id and _attributes(root)["gen_ai.operation.name"] == "text_completion"
    spans = _wait_for_trace(receiver, root.trace_id.hex())
    assert any(span.parent_span_id == root.span_id for s, span in spans if s != GATEWAY_SERVICE)


def test_tracing_setup_follows_the_otel_variables(capsys: pytest.CaptureFixture[str]) -> None:
    assert setup_tracing({}) is None
    assert "tracing off" in capsys.readouterr().err
    assert setup_tracing({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}) is None
    provider = setup_tracing({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "named"})
    assert provider is not None and "named" in capsys.readouterr().err
    provider.shutdown()  # type: ignore[attr-defined]
    assert os.environ.get("OTEL_SERVICE_NAME") != "named"  # read from the mapping given, not set globally
