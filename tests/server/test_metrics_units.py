"""The /metrics families from an ``EngineStats`` (no engine): vLLM names and types, model_name on
every series, the switch, residency, the load histogram, unloaded adapters' series gone."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.backend.engine.stats import AdapterResidency, EngineStats
from loraplex.backend.metrics import Metrics
from loraplex.backend.outputs import RequestOutput, RequestTimings
from tests.helpers import metric_value

MODEL = "demo-model"
STATS = EngineStats(num_waiting=2, num_running=3, kv_blocks_total=10, kv_blocks_used=4, lora_slots_total=2,
                    lora_slots_used=1, prompt_tokens=7, generation_tokens=9, preemptions=1, adapter_source_loads=1,
                    adapter_source_load_seconds=0.3, running_adapter_names=("upper",), waiting_adapter_names=("reverse",),
                    adapter_residency=(AdapterResidency("upper", "gpu", True, 8),
                                       AdapterResidency("reverse", "cpu", False, 4),
                                       AdapterResidency("think", "disk", False, 16)),
                    requests_by_adapter={"": 3, "upper": 2, "gone": 5}, tokens_by_adapter={"upper": 11, "gone": 4})


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_vllm_families_have_vllm_names_types_and_model_name() -> None:
    text = scrape(Metrics(lambda: STATS, model_name=MODEL))
    types = families(text)
    for name, kind in [("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:kv_cache_usage_perc", "gauge"), ("vllm:gpu_cache_usage_perc", "gauge"),
                       ("vllm:lora_requests_info", "gauge"), ("vllm:prompt_tokens", "counter"),
                       ("vllm:generation_tokens", "counter"), ("vllm:num_preemptions", "counter"),
                       ("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:inter_token_latency_seconds", "histogram"),
                       ("vllm:e2e_request_latency_seconds", "histogram"), ("vllm:lora_adapter_loaded", "gauge"),
                       ("vllm:num_gpu_loaded_lora_adapters", "gauge"), ("vllm:max_gpu_lora_adapters", "gauge"),
                       ("vllm:lora_adapter_load_seconds", "histogram")]:
        assert types.get(name) == kind, name
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("model_name") == MODEL, s
    assert metric_value(text, "vllm:num_requests_running") == 3
    assert metric_value(text, "vllm:kv_cache_usage_perc") == 0.4  # a fraction, as vLLM's
    assert metric_value(text, "vllm:prompt_tokens_total") == 7


def test_lora_requests_info_lists_adapters_with_a_timestamp_value() -> None:
    text = scrape(Metrics(lambda: STATS, model_name=MODEL))
    (info,) = [s for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info"
               for s in f.samples]
    assert info.labels["max_lora"] == "2"
    assert info.labels["running_lora_adapters"] == "upper"
    assert info.labels["waiting_lora_adapters"] == "reverse"
    assert info.value > 1.7e9  # wall-clock seconds: routers keep the newest series


def test_residency_lists_gpu_and_cpu_adapters_only() -> None:
    text = scrape(Metrics(lambda: STATS, model_name=MODEL))
    assert metric_value(text, "vllm:lora_adapter_loaded", 'adapter_name="upper",level="gpu",pinned="true",'
                                                          'rank="8"') == 1
    assert metric_value(text, "vllm:lora_adapter_loaded", 'adapter_name="reverse",level="cpu",pinned="false"') == 1
    assert 'adapter_name="think"' not in text  # only on disk: not loaded
    assert metric_value(text, "vllm:num_gpu_loaded_lora_adapters") == 1
    assert metric_value(text, "vllm:num_cpu_loaded_lora_adapters") == 1
    assert metric_value(text, "vllm:max_gpu_lora_adapters") == 2


def test_unloaded_adapters_lose_their_series() -> None:
    text = scrape(Metrics(lambda: STATS, model_name=MODEL))
    assert metric_value(text, "loraplex_lora_requests_total", 'adapter="upper"') == 2
    assert metric_value(text, "loraplex_lora_requests_total", 'adapter="base"') == 3
    assert 'adapter="gone"' not in text


def test_load_histogram_counts_each_load_once_across_scrapes() -> None:
    stats = EngineStats(adapter_source_loads=1, adapter_source_load_seconds=0.3)
    m = Metrics(lambda: stats)
    first = scrape(m)
    assert metric_value(first, "vllm:lora_adapter_load_seconds_bucket", 'le="0.25"') == 0
    assert metric_value(first, "vllm:lora_adapter_load_seconds_bucket", 'le="0.5"') == 1
    stats.adapter_source_loads, stats.adapter_source_load_seconds = 3, 4.3  # two more loads of 2 s each
    assert metric_value(scrape(m), "vllm:lora_adapter_load_seconds_count") == 3
    third = scrape(m)  # no new loads: nothing added again
    assert metric_value(third, "vllm:lora_adapter_load_seconds_count") == 3
    assert metric_value(third, "vllm:lora_adapter_load_seconds_bucket", 'le="2.5"') == 3
    assert metric_value(third, "vllm:lora_adapter_load_seconds_sum") == pytest.approx(4.3)


def test_request_histograms_are_observed_under_both_names() -> None:
    m = Metrics(model_name=MODEL)
    timings = RequestTimings(arrival=10.0, first_scheduled=10.5, first_token=11.0, finished=13.0)
    with m.tracker() as tracker:
        tracker.on_output(RequestOutput("r", [1], "a", timings=timings), now=11.0)
        tracker.on_output(RequestOutput("r", [2], "b", finished=True, finish_reason="length", timings=timings),
                          now=12.0)
    text = scrape(m)
    for prefix in ("loraplex_", "vllm:"):
        assert metric_value(text, f"{prefix}time_to_first_token_seconds_sum") == 1.0
        assert metric_value(text, f"{prefix}inter_token_latency_seconds_count") == 1
        assert metric_value(text, f"{prefix}e2e_request_latency_seconds_sum") == 3.0
    assert metric_value(text, "vllm:request_success_total", 'finished_reason="length"') == 1


def test_the_switch_leaves_out_every_vllm_family() -> None:
    m = Metrics(lambda: STATS, model_name=MODEL, vllm=False)
    with m.tracker() as tracker:
        tracker.finish("stop")
    text = scrape(m)
    assert "vllm:" not in text
    assert metric_value(text, "loraplex_num_requests_running") == 3


def test_promtool_accepts_the_families_but_for_vllm_colons() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    r = subprocess.run([promtool, "check", "metrics"], input=scrape(Metrics(lambda: STATS, model_name=MODEL)),
                       capture_output=True, text=True, timeout=30)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if line.strip() and "metric names should not contain ':'" not in line]
    assert not problems, problems
