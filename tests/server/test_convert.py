"""from_pb / to_pb: the edge between protobuf and engine types (no engine needed)."""

from __future__ import annotations

import math

import pytest

from loraplex.backend.outputs import Logprob, RequestOutput, RequestTimings, Usage
from loraplex.backend.server import convert
from loraplex.clients import pb
from loraplex.errors import InvalidRequestError
from loraplex.lora.types import AdapterInfo, AdapterState


def test_prompt_request_defaults_and_fresh_id() -> None:
    req = convert.request_from_pb(pb.GenerateRequest(prompt="hi", adapter="upper", priority=3))
    assert req.prompt == "hi" and req.adapter == "upper" and req.priority == 3
    assert len(req.request_id) == 32
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.repetition_penalty, p.seed, p.logprobs) == \
        (16, 1.0, 1.0, 1.0, None, None)
    assert p.skip_special_tokens is True


def test_params_set_fields_pass_through() -> None:
    params = pb.SamplingParameters(max_tokens=5, temperature=0.0, top_p=0.5, top_k=-1, seed=7, stop=["x"],
                                   stop_token_ids=[3], logprobs=0, prompt_logprobs=2, skip_special_tokens=False,
                                   ignore_eos=True, min_tokens=1)
    req = convert.request_from_pb(pb.GenerateRequest(request_id="r", token_ids=pb.TokenIds(ids=[1, 2]),
                                                     params=params))
    p = req.params
    assert req.request_id == "r" and req.prompt_token_ids == [1, 2] and req.adapter is None
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (5, 0.0, 0.5, 0, 7)
    assert (p.stop, p.stop_token_ids, p.logprobs, p.prompt_logprobs) == (["x"], [3], 0, 2)
    assert not p.skip_special_tokens and p.ignore_eos and p.min_tokens == 1


def test_chat_carries_kwargs_tools_and_generation_prompt_unrendered() -> None:
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="system", content="s"),
                                  pb.ChatMessage(role="assistant", content="", tool_calls_json=['{"id": "1"}']),
                                  pb.ChatMessage(role="tool", content="r", tool_call_id="1", name="n")],
                        tools_json=['{"type": "function"}'], chat_template_kwargs_json='{"enable_thinking": false}',
                        add_generation_prompt=False)
    req = convert.request_from_pb(pb.GenerateRequest(chat=chat))
    assert req.prompt is None and req.chat is not None  # the engine's input step renders it, once
    assert req.chat.messages[1]["tool_calls"] == [{"id": "1"}]
    assert req.chat.messages[2] == {"role": "tool", "content": "r", "name": "n", "tool_call_id": "1"}
    assert req.chat.tools == [{"type": "function"}] and req.chat.template_kwargs == {"enable_thinking": False}
    assert req.chat.add_generation_prompt is False
    plain = convert.request_from_pb(pb.GenerateRequest(chat=pb.ChatInput(
        messages=[pb.ChatMessage(role="user", content="x")]))).chat
    assert plain is not None
    assert plain.add_generation_prompt is True and plain.tools is None and plain.template_kwargs is None


def test_chat_without_max_tokens_runs_to_the_end_of_the_context() -> None:
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="user", content="x")])
    assert convert.request_from_pb(pb.GenerateRequest(chat=chat)).params.max_tokens is None
    capped = pb.GenerateRequest(chat=chat, params=pb.SamplingParameters(max_tokens=5))
    assert convert.request_from_pb(capped).params.max_tokens == 5


BAD = [
    (pb.GenerateRequest(), "input"),
    (pb.GenerateRequest(prompt=""), "prompt"),  # a oneof member has presence even when empty
    (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids"),
    (pb.GenerateRequest(chat=pb.ChatInput()), "chat.messages"),
    (pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="wizard")])), "chat.messages[0].role"),
    (pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user")], tools_json=["{"])),
     "chat.tools_json[0]"),
    (pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user")], tools_json=["[1]"])),
     "chat.tools_json[0]"),
    (pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user")],
                                          chat_template_kwargs_json='{"tokenize": true}')),
     "chat.chat_template_kwargs_json"),
    (pb.GenerateRequest(request_id="x" * 257, prompt="a"), "request_id"),
    (pb.GenerateRequest(request_id="a b", prompt="a"), "request_id"),
    (pb.GenerateRequest(prompt="a", params=pb.SamplingParameters(temperature=2.5)), "temperature"),
    (pb.GenerateRequest(prompt="a", params=pb.SamplingParameters(temperature=math.nan)), "temperature"),
    (pb.GenerateRequest(prompt="a", params=pb.SamplingParameters(top_p=0.0)), "top_p"),
    (pb.GenerateRequest(prompt="a", params=pb.SamplingParameters(top_k=-2)), "top_k"),
    (pb.GenerateRequest(prompt="a", params=pb.SamplingParameters(max_tokens=0)), "max_tokens"),
    (pb.GenerateRequest(prompt="a", params=pb.SamplingParameters(logprobs=21)), "logprobs"),
    (pb.GenerateRequest(prompt="a", params=pb.SamplingParameters(stop=["s"] * 17)), "stop"),
    (pb.GenerateRequest(prompt="a", params=pb.SamplingParameters(stop=["s" * 257])), "stop"),
    (pb.GenerateRequest(prompt="a", params=pb.SamplingParameters(seed=2**63)), "seed"),
    (pb.GenerateRequest(prompt="a", params=pb.SamplingParameters(presence_penalty=2.5)), "presence_penalty"),
]


@pytest.mark.parametrize(("request_pb", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_requests_name_the_field(request_pb: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        convert.request_from_pb(request_pb)
    assert err.value.field == field, err.value.message


def test_limits_at_the_edge_pass() -> None:
    params = pb.SamplingParameters(stop=["s" * 256] * 16, logprobs=20, prompt_logprobs=20, temperature=2.0,
                                   seed=2**63 - 1)
    convert.request_from_pb(pb.GenerateRequest(request_id="r" * 256, prompt="a", params=params))


def test_output_to_pb_delta_and_final() -> None:
    delta = RequestOutput("r", [5, 6], "ab", new_logprobs=[Logprob(5, -0.1, 1, [(5, -0.1), (7, -2.0)])],
                          prompt_logprobs=[None, Logprob(1, -1.0, 2)], adapter_version=2)
    msg = convert.output_to_pb(delta, lambda t: f"<{t}>")
    assert (msg.text, list(msg.token_ids), msg.finished, msg.adapter_version) == ("ab", [5, 6], False, 2)
    assert msg.logprobs[0].token == "<5>" and msg.logprobs[0].top[1].token_id == 7
    assert len(msg.prompt_logprobs) == 1 and msg.prompt_logprobs[0].rank == 2
    timings = RequestTimings(arrival=1.0, first_scheduled=1.5, first_token=2.0, finished=4.0)
    final = RequestOutput("r", [], "", finished=True, finish_reason="stop", stop_reason=258,
                          usage=Usage(3, 4, 1), timings=timings)
    msg = convert.output_to_pb(final, str)
    assert msg.finished and msg.finish_reason == "stop" and msg.stop_token_id == 258 and msg.stop_string == ""
    assert (msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens) == (3, 4, 1)
    assert (msg.timings.queue_time, msg.timings.time_to_first_token, msg.timings.e2e_latency) == (0.5, 1.0, 3.0)
    stop = convert.output_to_pb(RequestOutput("r", [], "", finished=True, finish_reason="stop",
                                              stop_reason="END", error=None), str)
    assert stop.stop_string == "END" and not stop.HasField("stop_token_id")
    aborted = convert.output_to_pb(RequestOutput("r", [], "", finished=True, finish_reason="abort",
                                                 error="engine step failed"), str)
    assert aborted.finish_reason == "abort" and aborted.error == "engine step failed"


def test_adapter_to_pb() -> None:
    info = AdapterInfo("a", 2, "/x", 8, AdapterState.CACHED, True, 1, 16.0, ("q_proj",))
    msg = convert.adapter_to_pb(info)
    assert (msg.name, msg.version, msg.state, msg.pinned, list(msg.target_modules)) == \
        ("a", 2, pb.ADAPTER_STATE_CACHED, True, ["q_proj"])
