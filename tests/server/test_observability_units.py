"""Metrics collector, request tracker, tracing configuration and span recorder (no engine needed)."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.engine.stats import EngineStats
from loraplex.backend.metrics import Metrics
from loraplex.backend.outputs import RequestOutput, RequestTimings, Usage
from loraplex.backend.sampling_params import SamplingParams
from loraplex.backend.tracing import (
    GenerateSpanRecorder,
    configure_tracing,
    extract_context,
    get_tracer,
    request_attributes,
)
from loraplex.gateway.tracing import PROVIDER_NAME as GATEWAY_PROVIDER_NAME
from tests.helpers import metric_value


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def sample(text: str, name: str, labels: str = "") -> float:
    assert f"\n{name}{{" in text, f"{name} not in /metrics"
    return metric_value(text, name, labels)


def test_engine_stats_become_loraplex_metrics() -> None:
    stats = EngineStats(num_waiting=2, num_running=3, kv_blocks_total=10, kv_blocks_used=4, prompt_tokens=7,
                        generation_tokens=9, preemptions=1, prefix_cache_queries=20, prefix_cache_hits=5,
                        adapter_source_loads=2, adapter_slot_evictions=1, adapters_resident=1, adapters_registered=4,
                        requests_by_adapter={"": 3, "upper": 2}, tokens_by_adapter={"upper": 11})
    text = scrape(Metrics(lambda: stats))
    assert sample(text, "loraplex_num_requests_waiting") == 2
    assert sample(text, "loraplex_kv_cache_usage_ratio") == 0.4
    assert sample(text, "loraplex_generation_tokens_total") == 9
    assert sample(text, "loraplex_prefix_cache_hits_total") == 5
    assert sample(text, "loraplex_num_preemptions_total") == 1
    assert sample(text, "loraplex_lora_adapters", 'state="registered"') == 4
    assert sample(text, "loraplex_lora_requests_total", 'adapter="base"') == 3
    assert 'adapter="upper"' not in text  # not registered (any more): its series are gone
    text = scrape(Metrics(lambda: stats, vllm=False))
    assert all(line.startswith(("#", "loraplex_")) for line in text.splitlines() if line)


def test_failing_stats_do_not_break_the_scrape() -> None:
    def broken() -> EngineStats:
        raise RuntimeError("engine gone")

    text = scrape(Metrics(broken))
    assert "loraplex_requests_total" in text or "loraplex_requests" in text
    assert "loraplex_num_requests_running" not in text


def test_request_tracker_observes_latencies_and_outcome_once() -> None:
    m = Metrics()
    timings = RequestTimings(arrival=10.0, first_scheduled=10.5, first_token=11.0, finished=13.0)
    with m.tracker() as tracker:
        assert sample(scrape(m), "loraplex_grpc_streams_in_flight") == 1
        tracker.on_output(RequestOutput("r", [1], "a", timings=timings), now=11.0)
        tracker.on_output(RequestOutput("r", [2, 3], "bc", timings=timings), now=12.0)
        tracker.on_output(RequestOutput("r", [], "", finished=True, finish_reason="length", timings=timings,
                                        usage=Usage(1, 3)), now=13.0)
        tracker.finish("cancelled")  # already counted: ignored
    text = scrape(m)
    assert sample(text, "loraplex_grpc_streams_in_flight") == 0
    assert sample(text, "loraplex_requests_total", 'outcome="length"') == 1
    assert 'outcome="cancelled"' not in text
    assert sample(text, "loraplex_time_to_first_token_seconds_sum") == 1.0
    assert sample(text, "loraplex_inter_token_latency_seconds_count") == 2
    assert sample(text, "loraplex_inter_token_latency_seconds_sum") == 1.0
    assert sample(text, "loraplex_e2e_request_latency_seconds_sum") == 3.0
    assert sample(text, "loraplex_request_queue_time_seconds_sum") == 0.5


def test_tracing_is_off_unless_configured() -> None:
    assert configure_tracing(environ={}) is None
    assert configure_tracing(environ={"OTEL_TRACES_EXPORTER": "none",
                                      "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}) is None
    assert configure_tracing(environ={"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) is None
    on = configure_tracing(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert on is not None
    on.shutdown()
    console = configure_tracing(environ={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "svc"})
    assert console is not None and console.resource.attributes["service.name"] == "svc"
    console.shutdown()


def test_span_continues_traceparent_and_has_genai_attributes() -> None:
    exporter = InMemorySpanExporter()
    tracer = get_tracer(configure_tracing(exporter))
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    parent = extract_context([("traceparent", f"00-{trace_id}-b7ad6b7169203331-01")])
    req = EngineRequest("r1", prompt="x", params=SamplingParams(max_tokens=4, temperature=0.5), adapter="upper")
    span = tracer.start_span("chat upper", context=parent)
    span.set_attributes(request_attributes(req, "chat", "demo"))
    recorder = GenerateSpanRecorder(span, "upper")
    timings = RequestTimings(arrival=1.0, first_scheduled=1.1, first_token=1.2, finished=1.3)
    recorder.on_output(RequestOutput("r1", [1], "A", timings=timings, adapter="upper", adapter_version=1))
    recorder.on_output(RequestOutput("r1", [], "", finished=True, finish_reason="stop", usage=Usage(5, 1),
                                     timings=timings))
    span.end()
    (done,) = exporter.get_finished_spans()
    assert format(done.context.trace_id, "032x") == trace_id
    a = done.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == GATEWAY_PROVIDER_NAME
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == "upper" and a["gen_ai.response.id"] == "r1"
    assert a["gen_ai.request.max_tokens"] == 4 and a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.top_p"] == 1.0 and tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (5, 1)
    assert [e.name for e in done.events] == ["queued", "adapter_ready", "prefill", "first_token", "finish"]
