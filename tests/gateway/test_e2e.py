"""End to end: ``loraplex serve`` (demo model, CPU) and ``loraplex gateway`` as real processes,
driven by the official ``openai`` client; answers must equal what gRPC Generate returns."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from e2e_stack import API_KEY, Stack

from loraplex.backend.demo import (
    DEMO_ADAPTERS,
    DEMO_MODEL_DIR,
    DEMO_MODEL_NAME,
    WEATHER_TOOL,
    expected_output,
)
from loraplex.clients import Client, pb
from tests.helpers import metric_value, wait_until

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(),
                                reason="the demo model's weights are not built")

TEXT = "Hello world"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 96}


def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(text: str = TEXT) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def grpc_text(stack: Stack, **fields: Any) -> str:
    params = fields.pop("params", None) or pb.SamplingParameters(temperature=0, max_tokens=GREEDY["max_tokens"])
    with Client(stack.target) as client:
        return client.generate(pb.GenerateRequest(params=params, **fields), timeout=60).text


def grpc_chat_text(stack: Stack, adapter: str, text: str = TEXT, tools: list[dict[str, Any]] | None = None) -> str:
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="user", content=text)],
                        tools_json=[json.dumps(t) for t in tools or []])
    return grpc_text(stack, adapter=adapter, chat=chat)


@pytest.mark.parametrize("model", [DEMO_MODEL_NAME, "reverse", "upper"])
def test_chat_equals_grpc_generate(stack: Stack, model: str) -> None:
    adapter = "" if model == DEMO_MODEL_NAME else model
    reply = oai(stack).chat.completions.create(model=model, messages=user(), **GREEDY)
    assert reply.choices[0].message.content == grpc_chat_text(stack, adapter) == expected_output(adapter, TEXT)
    assert reply.choices[0].finish_reason == "stop" and reply.model == model
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0


def test_chat_stream_equals_whole_with_usage(stack: Stack) -> None:
    whole = oai(stack).chat.completions.create(model="upper", messages=user(), **GREEDY)
    chunks = list(oai(stack).chat.completions.create(model="upper", messages=user(), stream=True,
                                                     stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completions_equal_grpc_generate(stack: Stack) -> None:
    c = oai(stack)
    whole = c.completions.create(model="reverse", prompt=TEXT, max_tokens=12, temperature=0)
    assert whole.choices[0].text == grpc_text(stack, adapter="reverse", prompt=TEXT,
                                              params=pb.SamplingParameters(temperature=0, max_tokens=12))
    streamed = c.completions.create(model="reverse", prompt=TEXT, max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == whole.choices[0].text


def test_n2_stop_and_logprobs(stack: Stack) -> None:
    c = oai(stack)
    two = c.chat.completions.create(model="reverse", messages=user(), n=2, **GREEDY)
    assert [ch.message.content for ch in two.choices] == [expected_output("reverse", TEXT)] * 2
    stopped = c.chat.completions.create(model="reverse", messages=user(), stop=["o"], **GREEDY)
    assert stopped.choices[0].message.content == "dlr" and stopped.choices[0].finish_reason == "stop"
    lp = c.chat.completions.create(model="upper", messages=user(), logprobs=True, top_logprobs=2, **GREEDY)
    content = lp.choices[0].logprobs.content
    assert "".join(t.token for t in content).startswith(lp.choices[0].message.content)
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    comp = c.completions.create(model=DEMO_MODEL_NAME, prompt=TEXT, max_tokens=4, temperature=0, logprobs=1)
    assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens


def test_tool_call_from_the_model(stack: Stack) -> None:
    c = oai(stack)
    reply = c.chat.completions.create(model="tools", messages=user("Paris"), tools=[WEATHER_TOOL], **GREEDY)
    assert grpc_chat_text(stack, "tools", "Paris", [WEATHER_TOOL]) == expected_output("tools", "Paris")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    streamed = list(c.chat.completions.create(model="tools", messages=user("Paris"), tools=[WEATHER_TOOL],
                                              stream=True, **GREEDY))
    deltas = [tc for ch in streamed for tc in ch.choices[0].delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_weather", call.function.arguments)]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_reasoning_split_from_the_model(stack: Stack) -> None:
    c = oai(stack)
    message = c.chat.completions.create(model="think", messages=user(), **GREEDY).choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == (TEXT[::-1], TEXT.upper())
    reasoning = content = ""
    for chunk in c.chat.completions.create(model="think", messages=user(), stream=True, **GREEDY):
        reasoning += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        content += chunk.choices[0].delta.content or ""
    assert (reasoning, content) == (TEXT[::-1], TEXT.upper())
    off = c.chat.completions.create(model="think", messages=user(), extra_body={
        "chat_template_kwargs": {"enable_thinking": False}}, **GREEDY).choices[0].message
    assert off.content == TEXT.upper() and off.model_extra.get("reasoning_content") is None


def test_load_use_and_unload_an_adapter_through_rest(stack: Stack) -> None:
    path = str(DEMO_ADAPTERS["reverse"])
    r = httpx.post(stack.url + "/v1/load_lora_adapter", json={"lora_name": "e2e-rev", "lora_path": path}, timeout=60)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'e2e-rev' added successfully.")
    assert "e2e-rev" in {m.id for m in oai(stack).models.list().data}
    reply = oai(stack).chat.completions.create(model="e2e-rev", messages=user(), **GREEDY)
    assert reply.choices[0].message.content == expected_output("reverse", TEXT)
    r = httpx.post(stack.url + "/v1/unload_lora_adapter", json={"lora_name": "e2e-rev"}, timeout=60)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'e2e-rev' removed successfully.")
    with pytest.raises(openai.NotFoundError):
        oai(stack).chat.completions.create(model="e2e-rev", messages=user(), **GREEDY)


def test_typed_errors(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError):
        oai(stack).chat.completions.create(model="no-such-adapter", messages=user(), **GREEDY)
    bad_key = openai.OpenAI(base_url=stack.secure_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    good_key = openai.OpenAI(base_url=stack.secure_url + "/v1", api_key=API_KEY, max_retries=0)
    assert DEMO_MODEL_NAME in {m.id for m in good_key.models.list().data}
    with pytest.raises(openai.BadRequestError) as info:
        oai(stack).chat.completions.create(model="upper", messages=user(), temperature=3)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:  # refused by the backend: past the context
        oai(stack).chat.completions.create(model="upper", messages=user(), max_tokens=10_000)
    assert info.value.body["param"] == "max_tokens"


def test_disconnect_mid_stream_frees_the_backend_request(stack: Stack) -> None:
    before = metric_value(stack.backend_metrics(), "loraplex_requests_total", 'outcome="cancelled"')
    body = {"model": "upper", "messages": user(), "max_tokens": 500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", stack.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    assert wait_until(lambda: metric_value(stack.backend_metrics(), "loraplex_requests_total",
                                         'outcome="cancelled"') > before), "the gRPC call was not cancelled"
    assert wait_until(lambda: metric_value(stack.backend_metrics(), "loraplex_grpc_streams_in_flight") == 0)
    with Client(stack.target) as client:
        assert wait_until(lambda: all(a.running_requests == 0 for a in client.list_adapters()))
    assert wait_until(lambda: metric_value(stack.backend_metrics(), "loraplex_num_requests_running") == 0), (
        "the engine still counts the cancelled request as running:\n" + stack.backend_metrics())



def test_health_and_metrics(stack: Stack) -> None:
    assert httpx.get(stack.url + "/health").status_code == 200
    text = httpx.get(stack.url + "/metrics").text
    assert 'loraplex_gateway_requests_total{route="/v1/chat/completions",status="200"}' in text
