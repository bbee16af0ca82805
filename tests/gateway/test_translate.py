"""OpenAI request → pb.GenerateRequest, and gRPC status → HTTP + OpenAI error JSON."""

from __future__ import annotations

import json

import grpc
import pytest

from loraplex.gateway.errors import from_grpc
from loraplex.gateway.protocol import ChatCompletionRequest, CompletionRequest
from loraplex.gateway.translate import chat_requests, completion_requests

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {"type": "object"}}}]


def test_chat_fields_reach_the_proto() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "a", "n": 2, "seed": 7, "temperature": 0.5, "top_p": 0.9, "max_completion_tokens": 9,
        "stop": "END", "presence_penalty": 0.1, "frequency_penalty": -0.2, "top_k": 5, "min_p": 0.05,
        "repetition_penalty": 1.1, "ignore_eos": True, "logprobs": True, "top_logprobs": 3, "min_tokens": 2,
        "chat_template_kwargs": {"enable_thinking": False}, "tools": TOOLS, "priority": 4,
        "messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
    })
    out = chat_requests(req, adapter="a", request_id="chatcmpl-x")
    assert [r.request_id for r in out] == ["chatcmpl-x-0", "chatcmpl-x-1"]
    assert [r.params.seed for r in out] == [7, 8]  # choices differ, yet reproducible
    r = out[0]
    p = r.params
    assert (r.adapter, r.priority, p.max_tokens, p.temperature, p.top_k, p.logprobs, p.min_tokens) == ("a", 4, 9, 0.5, 5, 3, 2)
    assert list(p.stop) == ["END"] and p.ignore_eos and abs(p.top_p - 0.9) < 1e-6
    assert abs(p.repetition_penalty - 1.1) < 1e-6 and abs(p.frequency_penalty + 0.2) < 1e-6
    msgs = r.chat.messages
    assert [m.role for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[1].content == "hi" and msgs[3].tool_call_id == "call_1"
    assert json.loads(msgs[2].tool_calls_json[0])["function"]["name"] == "get_weather"
    assert json.loads(r.chat.tools_json[0]) == TOOLS[0]
    assert json.loads(r.chat.chat_template_kwargs_json) == {"enable_thinking": False}
    assert r.chat.add_generation_prompt


def test_unset_fields_stay_unset() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    p = chat_requests(req, adapter="", request_id="r")[0].params
    for name in ("max_tokens", "temperature", "top_p", "seed", "logprobs", "repetition_penalty", "skip_special_tokens"):
        assert not p.HasField(name), name


def test_tool_choice_none_sends_no_tools() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                                                "tool_choice": "none"})
    assert len(chat_requests(req, adapter="", request_id="r")[0].chat.tools_json) == 0


def test_completion_prompts_fan_out_prompt_major() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]], "n": 2, "logprobs": 0, "max_tokens": 4})
    out = completion_requests(req, adapter="", request_id="cmpl-y")
    assert [list(r.token_ids.ids) for r in out] == [[1, 2], [1, 2], [3], [3]]
    assert [r.request_id for r in out] == [f"cmpl-y-{i}" for i in range(4)]
    assert all(r.params.HasField("logprobs") and r.params.logprobs == 0 for r in out)
    text = completion_requests(CompletionRequest.model_validate({"model": "m", "prompt": "hello"}), adapter="b", request_id="c")
    assert text[0].prompt == "hello" and text[0].params.max_tokens == 16  # OpenAI's default


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "status", "err_type"), [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
    (grpc.StatusCode.ALREADY_EXISTS, 409, "invalid_request_error"),
    (grpc.StatusCode.FAILED_PRECONDITION, 409, "invalid_request_error"),
    (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
    (grpc.StatusCode.UNAUTHENTICATED, 502, "server_error"),
    (grpc.StatusCode.INTERNAL, 500, "server_error"),
])
def test_grpc_status_maps_to_http(code: grpc.StatusCode, status: int, err_type: str) -> None:
    err = from_grpc(FakeRpcError(code, "something"))
    assert (err.status, err.type, err.code) == (status, err_type, code.name.lower())
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_backend_field_names_become_param() -> None:
    err = from_grpc(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: prompt + max_tokens exceed 256"))
    assert err.param == "max_tokens"
    assert from_grpc(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad thing happened")).param is None


def test_unknown_adapter_is_model_not_found() -> None:
    err = from_grpc(FakeRpcError(grpc.StatusCode.NOT_FOUND, "adapter 'x' is not registered"), model="x")
    assert (err.status, err.param, err.code) == (404, "model", "model_not_found")
    assert "The model `x` does not exist." in err.message
