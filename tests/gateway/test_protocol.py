"""Request validation: each bound at its limit passes, one past it is a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from loraplex.gateway.errors import OpenAIError, from_validation, loc_to_param
from loraplex.gateway.protocol import ChatCompletionRequest, CompletionRequest
from loraplex.gateway.serving import validate

MSG = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", **fields}


def error_of(model: type, body: dict[str, Any]) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        validate(model, body)
    return info.value


OK_CHAT = [
    chat(temperature=0), chat(temperature=2), chat(top_p=1), chat(top_p=1e-6), chat(n=1), chat(n=128),
    chat(stop=["x"] * 16), chat(stop="s" * 256), chat(logprobs=True, top_logprobs=20), chat(logprobs=True),
    chat(presence_penalty=-2, frequency_penalty=2), chat(seed=0), chat(seed=2**63 - 1), chat(top_k=-1),
    chat(min_p=1), chat(repetition_penalty=2), chat(max_tokens=1), chat(max_completion_tokens=5),
    chat(tools=TOOLS, tool_choice="auto"), chat(tools=TOOLS, tool_choice="none"),
    chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    chat(stream=True, stream_options={"include_usage": True}), chat(response_format={"type": "text"}),
    chat(response_format={"type": "json_object"}), chat(tools=TOOLS, tool_choice="required"),
    chat(chat_template_kwargs={"enable_thinking": False}), chat(ignore_eos=True, min_tokens=3),
    chat(messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
    chat(messages=[*MSG, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]),
    chat(unknown_future_field=1),
]

BAD_CHAT = [
    (chat(temperature=2.01), "temperature"), (chat(temperature=-0.1), "temperature"),
    (chat(top_p=0), "top_p"), (chat(top_p=1.01), "top_p"), (chat(n=0), "n"), (chat(n=129), "n"),
    (chat(stop="s" * 257), "stop"), (chat(stop=[""]), "stop"),
    (chat(top_logprobs=2), "top_logprobs"), ({"messages": MSG}, "model"), (chat(model=""), "model"),
    (chat(presence_penalty=-2.5), "presence_penalty"), (chat(frequency_penalty=2.5), "frequency_penalty"),
    (chat(seed=-1), "seed"), (chat(seed=2**63), "seed"), (chat(top_k=-2), "top_k"), (chat(min_p=1.5), "min_p"),
    (chat(repetition_penalty=0), "repetition_penalty"), (chat(max_tokens=0), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"), (chat(max_tokens=2**32), "max_tokens"),
    (chat(messages=[]), "messages"), ({"model": "m"}, "messages"),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages.[0].role"),
    (chat(messages=[{"role": "user"}]), "messages.[0]"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages.[0]"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "messages.[0].content"),
    (chat(tool_choice="auto"), "tool_choice"), (chat(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
    (chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice.function.name"),
    (chat(tools=[{"type": "function", "function": {"name": ""}}]), "tools.[0].function.name"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(response_format={"type": "xml"}), "response_format.type"),
    (chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (chat(logit_bias={"1": 5}), "logit_bias"), (chat(temperature="hot"), "temperature"),
]

BAD_COMPLETION = [
    (completion(logprobs=-1), "logprobs"), ({"prompt": "hi"}, "model"), (completion(prompt=[]), "prompt"),
    (completion(prompt=[[]]), "prompt"), (completion(prompt=[-1]), "prompt"), (completion(suffix="x"), "suffix"),
    (completion(best_of=3, n=2), "best_of"), (completion(max_tokens=0), "max_tokens"),
    ({"model": "m"}, "prompt"), (completion(n=200), "n"),
]


@pytest.mark.parametrize("body", OK_CHAT)
def test_chat_accepts_values_at_the_limits(body: dict[str, Any]) -> None:
    validate(ChatCompletionRequest, body)


@pytest.mark.parametrize(("body", "param"), BAD_CHAT)
def test_chat_rejects_one_past_the_limit_naming_the_field(body: dict[str, Any], param: str) -> None:
    err = error_of(ChatCompletionRequest, body)
    assert err.status == 400
    assert err.param == param
    assert err.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETION)
def test_completion_rejects_bad_values(body: dict[str, Any], param: str) -> None:
    err = error_of(CompletionRequest, body)
    assert (err.status, err.param) == (400, param)


def test_completion_accepts_every_prompt_form() -> None:
    for prompt, expected in [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])]:
        assert validate(CompletionRequest, completion(prompt=prompt)).prompts() == expected
    assert validate(CompletionRequest, completion(logprobs=20, stop=["x"] * 16)).logprobs == 20


def test_message_names_the_bound_like_openai() -> None:
    err = error_of(ChatCompletionRequest, chat(temperature=3))
    assert err.message == "Invalid 'temperature': integer above maximum value. Expected a value <= 2, but got 3 instead."
    assert error_of(ChatCompletionRequest, {"model": "m"}).code == "missing_required_parameter"


def test_body_must_be_an_object() -> None:
    assert error_of(ChatCompletionRequest, [1, 2]).status == 400  # type: ignore[arg-type]


def test_loc_to_param_uses_openai_paths() -> None:
    assert loc_to_param(("messages", 3, "content")) == "messages.[3].content"
    assert loc_to_param(()) is None


def test_derived_fields() -> None:
    req = validate(ChatCompletionRequest, chat(max_tokens=5, max_completion_tokens=7, logprobs=True,
                                               stream=True, stream_options={"include_usage": True}))
    assert req.max_output_tokens == 7
    assert req.top_logprobs_count == 0
    assert req.include_usage
    named = validate(ChatCompletionRequest, chat(tools=TOOLS + [{"type": "function", "function": {"name": "other"}}],
                                                 tool_choice={"type": "function", "function": {"name": "other"}}))
    assert [t.function.name for t in named.tools_for_template()] == ["other"]
    assert validate(ChatCompletionRequest, chat(tools=TOOLS, tool_choice="none")).tools_for_template() == []


def test_from_validation_keeps_the_first_error() -> None:
    from pydantic import ValidationError

    try:
        ChatCompletionRequest.model_validate(chat(n=0, temperature=5))
    except ValidationError as exc:
        assert from_validation(exc).param in {"n", "temperature"}
