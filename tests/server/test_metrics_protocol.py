"""A real server (demo model, real engine) under mixed-adapter traffic, read as the Gateway API
Inference Extension's model-server protocol and llm-d's LoRA scorers read a vLLM endpoint."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.backend.cli_args import add_config_flags, server_config_from_args
from loraplex.backend.demo import DEMO_ADAPTERS
from loraplex.clients import Client
from tests.helpers import metric_value
from tests.server.harness import RunningServer, chat_request, start_server, stop_server

# what the endpoint picker, llm-d's scorers and AIBrix read, with vLLM's types
PROTOCOL = {"vllm:num_requests_waiting": "gauge", "vllm:num_requests_running": "gauge",
            "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
            "vllm:lora_requests_info": "gauge", "vllm:lora_adapter_loaded": "gauge",
            "vllm:num_gpu_loaded_lora_adapters": "gauge", "vllm:max_gpu_lora_adapters": "gauge",
            "vllm:lora_adapter_load_seconds": "histogram", "vllm:prompt_tokens": "counter",
            "vllm:generation_tokens": "counter", "vllm:num_preemptions": "counter",
            "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
            "vllm:e2e_request_latency_seconds": "histogram"}
LONG_TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """max_loras=1: while one adapter's requests run, another adapter's requests wait."""
    rs = start_server({"max_loras": 1})
    yield rs
    stop_server(rs)


def lora_info(text: str) -> dict[str, str]:
    (sample,) = [s for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info"
                 for s in f.samples]
    return sample.labels


def test_protocol_names_types_and_model_name(server: RunningServer) -> None:
    text = server.scrape()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert {name: types.get(name) for name in PROTOCOL} == PROTOCOL
    model = server.engine.model_name
    for family in text_string_to_metric_families(text):
        assert all(s.labels.get("model_name") == model for s in family.samples), family.name
    assert lora_info(text)["max_lora"] == "1"


def send_until(server: RunningServer, adapter: str, stop: threading.Event, errors: list[BaseException]) -> None:
    try:
        with Client(server.target) as client:
            while not stop.is_set():
                client.generate(chat_request(LONG_TEXT, adapter, max_tokens=96), timeout=60)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_lora_requests_info_and_kv_usage_follow_the_load(server: RunningServer) -> None:
    stop, errors = threading.Event(), []
    senders = [threading.Thread(target=send_until, args=(server, a, stop, errors), daemon=True)
               for a in ("upper", "upper", "reverse", "reverse", "")]
    for t in senders:
        t.start()
    seen_running, seen_waiting, kv_max = set(), set(), 0.0
    deadline = time.monotonic() + 40
    try:
        while time.monotonic() < deadline and not (seen_running >= {"upper", "reverse"} and seen_waiting and kv_max):
            text = server.scrape()
            info = lora_info(text)
            seen_running |= set(filter(None, info["running_lora_adapters"].split(",")))
            seen_waiting |= set(filter(None, info["waiting_lora_adapters"].split(",")))
            kv_max = max(kv_max, metric_value(text, "vllm:kv_cache_usage_perc"))
            time.sleep(0.01)
    finally:
        stop.set()
        for t in senders:
            t.join(60)
    assert not errors, errors
    assert seen_running >= {"upper", "reverse"}, seen_running
    assert seen_waiting & {"upper", "reverse"}, seen_waiting
    assert kv_max > 0
    idle = server.scrape()
    assert lora_info(idle)["running_lora_adapters"] == "" and lora_info(idle)["waiting_lora_adapters"] == ""
    assert metric_value(idle, "vllm:kv_cache_usage_perc") == 0
    assert metric_value(idle, "vllm:num_requests_running") == 0
    # one GPU slot: the adapter that ran last stays in it, the other is in the host cache
    levels = {a: [lv for lv in ("gpu", "cpu")
                  if metric_value(idle, "vllm:lora_adapter_loaded", f'adapter_name="{a}",level="{lv}"') == 1]
              for a in ("upper", "reverse")}
    assert sorted(levels.values()) == [["cpu"], ["gpu"]], levels
    assert metric_value(idle, "vllm:num_gpu_loaded_lora_adapters") == 1


def test_an_unloaded_adapter_loses_its_series(server: RunningServer) -> None:
    with Client(server.target) as client:
        client.load_adapter("upper-copy", str(DEMO_ADAPTERS["upper"]), timeout=30)
        client.generate(chat_request("hello", "upper-copy"), timeout=30)
        text = server.scrape()
        assert metric_value(text, "loraplex_lora_requests_total", 'adapter="upper-copy"') == 1
        assert metric_value(text, "vllm:lora_adapter_loaded", 'adapter_name="upper-copy"') == 1
        client.unload_adapter("upper-copy", timeout=30)
        client.generate(chat_request("hello"), timeout=30)  # stats refresh on an engine step
    text = server.scrape()
    assert 'adapter="upper-copy"' not in text and 'adapter_name="upper-copy"' not in text


def test_promtool_accepts_the_endpoint_but_for_vllm_colons(server: RunningServer) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    r = subprocess.run([promtool, "check", "metrics"], input=server.scrape(), capture_output=True, text=True,
                       timeout=30)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if line.strip() and "metric names should not contain ':'" not in line]
    assert not problems, problems


def test_no_vllm_metrics_flag_turns_the_vllm_families_off() -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    config = server_config_from_args(parser.parse_args(["--no-vllm-metrics"]), environ={})
    assert config.vllm_metrics is False
    rs = start_server(server_kwargs={"vllm_metrics": config.vllm_metrics})
    try:
        text = rs.scrape()
    finally:
        stop_server(rs)
    assert "vllm:" not in text
    assert metric_value(text, "loraplex_engine_loop_alive", f'model_name="{rs.engine.model_name}"') == 1



@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "core-process"])
def either(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    rs = start_server({"max_loras": 1}, engine_process=request.param)
    yield rs
    stop_server(rs)


def test_unload_updates_slot_and_adapter_gauges_without_a_new_request(either: RunningServer) -> None:
    """Issue 11: the gauges follow an unload on an idle server before it returns, not at the next step."""
    with Client(either.target) as client:
        client.load_adapter("upper-idle", str(DEMO_ADAPTERS["upper"]), timeout=30)
        client.generate(chat_request("hello", "upper-idle"), timeout=30)  # now in the one GPU slot
        before = either.scrape()
        assert metric_value(before, "loraplex_lora_slots_used") == 1
        assert metric_value(before, "vllm:lora_adapter_loaded", 'adapter_name="upper-idle",level="gpu"') == 1
        registered = metric_value(before, "loraplex_lora_adapters", 'state="registered"')
        client.unload_adapter("upper-idle", timeout=30)
        after = either.scrape()  # no request in between: nothing steps the engine
    assert metric_value(after, "loraplex_lora_slots_used") == 0
    assert metric_value(after, "vllm:num_gpu_loaded_lora_adapters") == 0
    assert metric_value(after, "loraplex_lora_adapters", 'state="registered"') == registered - 1
    assert 'adapter_name="upper-idle"' not in after
