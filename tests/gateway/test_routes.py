"""The routes over real HTTP (uvicorn on loopback) against the fake gRPC backend, driven by
the official openai client and raw httpx where the exact wire format matters."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from fake_backend import BASE, transform
from gateway_harness import GatewayHarness

USER = [{"role": "user", "content": "hello"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def client(gw: GatewayHarness) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def sse_events(gw: GatewayHarness, path: str, body: dict[str, Any]) -> list[Any]:
    """The decoded ``data:`` payloads of one streamed answer (``[DONE]`` kept as a string)."""
    events: list[Any] = []
    with httpx.stream("POST", gw.url + path, json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert line == "", line
    return events


def test_models_lists_base_and_every_adapter(gw: GatewayHarness) -> None:
    models = {m.id: m for m in client(gw).models.list().data}
    assert set(models) >= {BASE, "reverse", "think", "tools"}
    assert models["reverse"].parent == BASE and models[BASE].parent is None
    assert all(m.owned_by == "loraplex" and m.object == "model" for m in models.values())


@pytest.mark.parametrize("model", [BASE, "reverse", "upper"])
def test_chat_answers_with_the_adapters_text(gw: GatewayHarness, model: str) -> None:
    r = client(gw).chat.completions.create(model=model, messages=USER, max_tokens=50)
    adapter = "" if model == BASE else model
    assert r.choices[0].message.content == transform(adapter, "hello")
    assert r.choices[0].finish_reason == "stop" and r.model == model and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 5 and r.usage.total_tokens == 10
    assert r.usage.prompt_tokens_details.cached_tokens == 2
    assert gw.servicer.requests[-1].adapter == adapter


def test_chat_stream_wire_format(gw: GatewayHarness) -> None:
    events = sse_events(gw, "/v1/chat/completions", {"model": "reverse", "messages": USER, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    middle = [c["choices"][0] for c in chunks[1:-1]]
    assert all(set(ch["delta"]) == {"content"} and ch["finish_reason"] is None for ch in middle)
    assert "".join(ch["delta"]["content"] for ch in middle) == "olleh"


def test_stream_usage_chunk_with_include_usage(gw: GatewayHarness) -> None:
    events = sse_events(gw, "/v1/chat/completions", {"model": BASE, "messages": USER, "stream": True,
                                                      "stream_options": {"include_usage": True}})
    *chunks, usage_chunk, done = events
    assert done == "[DONE]"
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
                                    "prompt_tokens_details": {"cached_tokens": 2}}


def test_sdk_stream_include_usage(gw: GatewayHarness) -> None:
    stream = client(gw).chat.completions.create(model="upper", messages=USER, stream=True,
                                                stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "HELLO"
    assert chunks[-1].usage.completion_tokens == 5


def test_n2_fans_out_with_distinct_request_ids(gw: GatewayHarness) -> None:
    before = len(gw.servicer.requests)
    r = client(gw).chat.completions.create(model=BASE, messages=USER, n=2, seed=3)
    sent = gw.servicer.requests[before:]
    assert len(sent) == 2 and sent[0].request_id != sent[1].request_id
    assert sorted(s.params.seed for s in sent) == [3, 4]
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.content == "hello" for c in r.choices)
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 10


def test_n2_streams_both_choices(gw: GatewayHarness) -> None:
    events = sse_events(gw, "/v1/chat/completions", {"model": BASE, "messages": USER, "n": 2, "stream": True})
    texts = {0: "", 1: ""}
    finishes = {}
    for c in events[:-1]:
        ch = c["choices"][0]
        texts[ch["index"]] += ch["delta"].get("content") or ""
        if ch["finish_reason"]:
            finishes[ch["index"]] = ch["finish_reason"]
    assert texts == {0: "hello", 1: "hello"} and finishes == {0: "stop", 1: "stop"}


def test_stop_and_length(gw: GatewayHarness) -> None:
    c = client(gw)
    r = c.chat.completions.create(model=BASE, messages=USER, stop=["ll"])
    assert r.choices[0].message.content == "he" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == "ll"
    r = c.completions.create(model=BASE, prompt="abcdefgh", max_tokens=3)
    assert r.choices[0].text == "abc" and r.choices[0].finish_reason == "length"


def test_chat_logprobs_shape(gw: GatewayHarness) -> None:
    r = client(gw).chat.completions.create(model=BASE, messages=USER, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == list("hello")
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)
    assert gw.servicer.requests[-1].params.logprobs == 2


def test_completion_logprobs_shape(gw: GatewayHarness) -> None:
    r = client(gw).completions.create(model=BASE, prompt="abc", logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["a", "b", "c"] and lp.text_offset == [0, 1, 2]
    assert lp.token_logprobs == [-0.5] * 3 and all(len(t) == 2 for t in lp.top_logprobs)


def test_completions_many_prompts_n_and_stream(gw: GatewayHarness) -> None:
    c = client(gw)
    r = c.completions.create(model="reverse", prompt=["ab", "cde"], n=2)
    assert [(ch.index, ch.text) for ch in r.choices] == [(0, "ba"), (1, "ba"), (2, "edc"), (3, "edc")]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 10
    events = sse_events(gw, "/v1/completions", {"model": BASE, "prompt": "hey", "stream": True, "echo": True})
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "heyhey"
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"


def test_tool_call_parsed(gw: GatewayHarness) -> None:
    r = client(gw).chat.completions.create(model="tools", messages=[{"role": "user", "content": "Paris"}],
                                           tools=TOOLS, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert len(gw.servicer.requests[-1].chat.tools_json) == 1


def test_tool_call_streamed(gw: GatewayHarness) -> None:
    stream = client(gw).chat.completions.create(model="tools", messages=[{"role": "user", "content": "Oslo"}],
                                                tools=TOOLS, max_tokens=200, stream=True)
    calls, finish = [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Oslo"})]


def test_without_tools_the_markup_stays_content(gw: GatewayHarness) -> None:
    r = client(gw).chat.completions.create(model="tools", messages=USER, max_tokens=200)
    assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content


def test_reasoning_split(gw: GatewayHarness) -> None:
    c = client(gw)
    r = c.chat.completions.create(model="think", messages=USER, max_tokens=100)
    message = r.choices[0].message
    assert message.content == "hello" and message.model_extra["reasoning_content"] == "about hello"
    stream = c.chat.completions.create(model="think", messages=USER, max_tokens=100, stream=True)
    reasoning = content = ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    assert (reasoning, content) == ("about hello", "hello")


def test_unknown_model_is_404(gw: GatewayHarness) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(gw).chat.completions.create(model="nope", messages=USER)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client(gw).completions.create(model="nope", prompt="x", stream=True)


@pytest.mark.parametrize(("fields", "param"), [({"temperature": 2.5}, "temperature"), ({"n": 0}, "n"),
                                               ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
                                               ({"max_tokens": 100000}, "max_tokens")])
def test_bad_parameters_are_400(gw: GatewayHarness, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).chat.completions.create(model=BASE, messages=USER, **fields)
    assert info.value.body["param"] == param


def test_overload_and_drain(gw: GatewayHarness) -> None:
    with pytest.raises(openai.RateLimitError):
        client(gw).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "FULL"}])
    with pytest.raises(openai.InternalServerError) as info:
        client(gw).completions.create(model=BASE, prompt="DRAIN", stream=True)
    assert info.value.status_code == 503


def test_error_after_stream_began_is_an_sse_error_event(gw: GatewayHarness) -> None:
    events = sse_events(gw, "/v1/chat/completions", {"model": "crash", "messages": USER, "stream": True})
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["message"] == "engine failed" and events[-2]["error"]["type"] == "server_error"
    with pytest.raises(openai.APIError, match="engine failed"):
        list(client(gw).chat.completions.create(model="crash", messages=USER, stream=True))


def test_backend_abort_is_an_error_not_a_finish_reason(gw: GatewayHarness) -> None:
    with pytest.raises(openai.InternalServerError, match="engine step failed") as info:
        client(gw).chat.completions.create(model="abort", messages=USER)
    assert info.value.status_code == 503
    events = sse_events(gw, "/v1/completions", {"model": "abort", "prompt": "hi", "stream": True})
    assert events[-2]["error"]["code"] == "request_aborted" and events[-1] == "[DONE]"


def test_invalid_json_and_unknown_route(gw: GatewayHarness) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(gw.url + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
