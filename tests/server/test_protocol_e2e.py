"""Reflection-only clients, fuzzed request bytes, and traces continuing the caller's traceparent."""

from __future__ import annotations

import secrets
import time

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loraplex.backend.demo import DEMO_ADAPTERS, expected_output
from loraplex.clients import Client, pb
from tests.server.harness import RunningServer, chat_request

SERVICE = "loraplex.v1.InferenceService"
ACCEPTABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_reflection_only_client_discovers_and_calls_generate(demo: RunningServer) -> None:
    with grpc.insecure_channel(demo.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert SERVICE in db.get_services() and "grpc.health.v1.Health" in db.get_services()
        pool = DescriptorPool(db)
        method = pool.FindServiceByName(SERVICE).methods_by_name["Generate"]
        assert method.server_streaming
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        assert request_cls is not pb.GenerateRequest
        request = json_format.ParseDict({"adapter": "upper", "chat": {"messages": [{"role": "user",
                                         "content": "reflect me"}]}, "params": {"temperature": 0, "maxTokens": 32}},
                                        request_cls())
        generate = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=request_cls.SerializeToString,
                                        response_deserializer=response_cls.FromString)
        chunks = list(generate(request, timeout=30))
    assert "".join(c.text for c in chunks) == expected_output("upper", "reflect me")
    assert chunks[-1].finished and chunks[-1].finish_reason == "stop"


def _raw_generate(channel: grpc.Channel, data: bytes) -> grpc.StatusCode:
    """Sends raw bytes as a Generate request; returns the status (OK once a first message arrives)."""
    call = channel.unary_stream(f"/{SERVICE}/Generate")(data, timeout=30)
    try:
        next(call)
        return grpc.StatusCode.OK
    except StopIteration:
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()
    finally:
        call.cancel()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=256))
def test_fuzzed_request_bytes_never_crash_the_server(demo: RunningServer, data: bytes) -> None:
    with grpc.insecure_channel(demo.target) as channel:
        code = _raw_generate(channel, data)
    assert code in ACCEPTABLE | {grpc.StatusCode.OK}, (data, code)


def _fields() -> st.SearchStrategy[bytes]:
    """Mostly well-formed GenerateRequests with extreme field values."""
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    params = st.builds(pb.SamplingParameters, max_tokens=st.integers(0, 2**32 - 1), temperature=floats,
                       top_p=floats, top_k=st.integers(-2**31, 2**31 - 1), min_p=floats,
                       repetition_penalty=floats, stop=st.lists(st.text(max_size=300), max_size=20),
                       stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=5),
                       logprobs=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**64 - 1))
    request = st.builds(pb.GenerateRequest, request_id=st.text(max_size=300), adapter=st.text(max_size=20),
                        prompt=st.text(max_size=64), params=params, priority=st.integers(-2**31, 2**31 - 1))
    return request.map(lambda r: r.SerializeToString())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_fields())
def test_fuzzed_field_values_never_crash_the_server(demo: RunningServer, data: bytes) -> None:
    with grpc.insecure_channel(demo.target) as channel:
        code = _raw_generate(channel, data)
    assert code in ACCEPTABLE | {grpc.StatusCode.OK}, (pb.GenerateRequest.FromString(data), code)


def test_server_still_right_after_fuzzing(demo: RunningServer) -> None:
    with Client(demo.target) as client:
        assert client.generate(chat_request("after fuzz", "reverse"), timeout=30).text == \
            expected_output("reverse", "after fuzz")
        assert client.health()


def _spans_of(exporter: InMemorySpanExporter, trace_id: str, wait: float = 5.0) -> list:
    deadline = time.monotonic() + wait
    while True:
        spans = [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
        if spans or time.monotonic() > deadline:
            return spans
        time.sleep(0.02)


def test_trace_continues_callers_traceparent_with_genai_attributes(demo: RunningServer,
                                                                   span_exporter: InMemorySpanExporter) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    metadata = [("traceparent", f"00-{trace_id}-{parent_id}-01")]
    with Client(demo.target) as client:
        result = client.generate(chat_request("trace me", "upper", max_tokens=32), metadata=metadata, timeout=30)
    (span,) = _spans_of(span_exporter, trace_id)
    assert format(span.parent.span_id, "016x") == parent_id and span.name == "chat upper"
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "loraplex"
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == "upper"
    assert a["gen_ai.response.id"] == a["loraplex.request.id"] != ""
    assert a["gen_ai.request.max_tokens"] == 32 and a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.request.top_p"] == 1.0
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert a["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == result.usage.completion_tokens
    names = [e.name for e in span.events]
    assert names[0] == "queued" and {"adapter_ready", "prefill", "first_token"} <= set(names)
    assert names[-1] == "finish"


def test_adapter_operations_are_traced(demo: RunningServer, span_exporter: InMemorySpanExporter) -> None:
    trace_id = secrets.token_hex(16)
    metadata = [("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")]
    with Client(demo.target) as client:
        client.load_adapter("traced", str(DEMO_ADAPTERS["reverse"]), metadata=metadata, timeout=30)
        client.unload_adapter("traced", metadata=metadata, timeout=30)
    spans = _spans_of(span_exporter, trace_id)
    deadline = time.monotonic() + 5
    while len(spans) < 2 and time.monotonic() < deadline:
        spans = _spans_of(span_exporter, trace_id)
    assert sorted(s.name for s in spans) == ["load_adapter traced", "unload_adapter traced"]
    assert all(s.attributes["loraplex.adapter"] == "traced" for s in spans)
