"""Client disconnects cancel backend calls; adapters load and unload; health, metrics, tracing."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fake_backend import BASE
from gateway_harness import GatewayHarness

from loraplex.gateway.config import GatewayConfig

SLOW = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400}


def test_disconnect_mid_stream_cancels_the_backend_call(gw: GatewayHarness) -> None:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**SLOW, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert gw.servicer.running == 1
    assert gw.wait_until(lambda: gw.servicer.running == 0), "backend call still running after disconnect"
    metrics = httpx.get(gw.url + "/metrics").text
    assert "loraplex_gateway_client_disconnects_total 1.0" in metrics


def test_disconnect_while_waiting_for_a_whole_answer_cancels_too(gw: GatewayHarness) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 400}, timeout=0.5)
    assert gw.wait_until(lambda: gw.servicer.running == 0)


def test_sdk_breaking_out_of_a_stream_cancels(gw: GatewayHarness) -> None:
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with c.chat.completions.create(**SLOW, stream=True) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
    assert gw.wait_until(lambda: gw.servicer.running == 0)


def test_load_use_and_unload_an_adapter(gw: GatewayHarness) -> None:
    r = httpx.post(gw.url + "/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": "/adapters/reverse"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'mine' added successfully."
    assert "mine" in {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    c.completions.create(model="mine", prompt="x")
    assert gw.servicer.requests[-1].adapter == "mine"
    again = httpx.post(gw.url + "/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": "/adapters/reverse"})
    assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
    inplace = httpx.post(gw.url + "/v1/load_lora_adapter",
                         json={"lora_name": "mine", "lora_path": "/adapters/upper", "load_inplace": True})
    assert inplace.status_code == 200 and gw.servicer.adapters["mine"].version == 2
    r = httpx.post(gw.url + "/v1/unload_lora_adapter", json={"lora_name": "mine"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'mine' removed successfully."
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="mine", prompt="x")


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/load_lora_adapter", {"lora_name": "a"}, 400),
    ("/v1/load_lora_adapter", {"lora_path": "/adapters/x"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/forbidden/x"}, 403),
    ("/v1/unload_lora_adapter", {}, 400),
    ("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, 404),
])
def test_adapter_route_errors(gw: GatewayHarness, path: str, body: dict[str, str], status: int) -> None:
    r = httpx.post(gw.url + path, json=body)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_health_follows_the_backend(gw: GatewayHarness) -> None:
    assert httpx.get(gw.url + "/health").status_code == 200
    gw.servicer.serving = False
    try:
        r = httpx.get(gw.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_not_serving"
    finally:
        gw.servicer.serving = True


def test_metrics_are_prefixed_and_count_requests(gw: GatewayHarness) -> None:
    httpx.get(gw.url + "/v1/models")
    text = httpx.get(gw.url + "/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert names and all(n.startswith("loraplex_gateway_") for n in names)
    assert 'loraplex_gateway_requests_total{route="/v1/models",status="200"}' in text
    assert "loraplex_gateway_request_duration_seconds_bucket" in text


def test_traceparent_is_continued_into_grpc_metadata(gw: GatewayHarness) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    header = f"00-{trace_id}-b7ad6b7169203331-01"
    httpx.post(gw.url + "/v1/chat/completions", headers={"traceparent": header},
               json={"model": BASE, "messages": [{"role": "user", "content": "hi"}]})
    sent = gw.servicer.metadata[-1]["traceparent"]
    assert sent.split("-")[1] == trace_id and sent.split("-")[2] != "b7ad6b7169203331"
    span = [s for s in gw.spans.get_finished_spans() if s.context.trace_id == int(trace_id, 16)][-1]
    assert span.name == "POST /v1/chat/completions" and span.parent.span_id == int("b7ad6b7169203331", 16)
    assert format(span.context.span_id, "016x") == sent.split("-")[2]


def test_a_trace_starts_when_the_caller_sends_none(gw: GatewayHarness) -> None:
    httpx.post(gw.url + "/v1/completions", json={"model": BASE, "prompt": "hi", "stream": True})
    sent = gw.servicer.metadata[-1]["traceparent"]
    span = gw.spans.get_finished_spans()[-1]
    assert sent.split("-")[1] == format(span.context.trace_id, "032x") and span.parent is None
    assert json.loads(json.dumps(dict(span.attributes)))["http.response.status_code"] == 200


def test_served_name_and_parser_switches() -> None:
    harness = GatewayHarness(GatewayConfig(served_model_name="my-base", reasoning_parser="none", tool_parser="none"))
    try:
        c = openai.OpenAI(base_url=harness.url + "/v1", api_key="x", max_retries=0)
        assert c.models.list().data[0].id == "my-base"
        assert c.completions.create(model="my-base", prompt="hi").model == "my-base"
        assert harness.servicer.requests[-1].adapter == ""
        with pytest.raises(openai.NotFoundError):  # the backend's own name is not served under an override
            c.completions.create(model=BASE, prompt="hi")
        think = c.chat.completions.create(model="think", messages=[{"role": "user", "content": "a"}], max_tokens=99)
        assert think.choices[0].message.content.startswith("<think>")
        tools = c.chat.completions.create(model="tools", messages=[{"role": "user", "content": "a"}], max_tokens=99,
                                          tools=[{"type": "function", "function": {"name": "get_weather"}}])
        assert tools.choices[0].message.tool_calls is None and tools.choices[0].finish_reason == "stop"
    finally:
        harness.close()


def test_think_open_mode_reads_reasoning_until_the_closing_tag() -> None:
    harness = GatewayHarness(GatewayConfig(reasoning_parser="think-open"))
    try:
        c = openai.OpenAI(base_url=harness.url + "/v1", api_key="x", max_retries=0)
        base = c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "plan</think>done"}])
        assert base.choices[0].message.model_extra["reasoning_content"] == "plan"
        assert base.choices[0].message.content == "done"
        off = c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "plain"}],
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert off.choices[0].message.content == "plain"
    finally:
        harness.close()
