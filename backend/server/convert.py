"""Protobuf stops here: ``from_pb`` builds engine types, ``to_pb`` builds messages.

Checks that belong to the wire format (exactly one input, JSON fields, roles,
request id shape) happen here; the sampling bounds are ``SamplingParams``'s own.
What needs the model (chat template, tokens, context length, vocabulary) is the
engine's input step (``engine.input_processor``), run once per request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from loraplex.backend.engine.request import ChatInput, EngineRequest
from loraplex.backend.outputs import Logprob, RequestOutput, RequestTimings, Usage
from loraplex.backend.sampling_params import SamplingParams
from loraplex.backend.server.json_depth import check_json_depth
from loraplex.backend.server.messages import Msg
from loraplex.backend.server.structured_pb import structured_from_pb
from loraplex.clients.v1 import inference_pb2 as pb
from loraplex.errors import InvalidRequestError
from loraplex.lora.types import AdapterInfo, AdapterState

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_REQUEST_ID_CHARS = 256
TokenText = Callable[[int], str]


# keyword arguments the server sets itself; a template kwarg may not override them
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "conversation", "tools", "documents", "tokenize",
                                      "return_dict", "return_tensors", "add_generation_prompt",
                                      "continue_final_message", "padding", "truncation", "max_length"})


# ---- from_pb ---------------------------------------------------------------------------------


def request_from_pb(req: pb.GenerateRequest) -> EngineRequest:
    """The engine request for a Generate call; raises InvalidRequestError naming the bad field."""
    request_id = request_id_from_pb(req.request_id)
    kind = req.WhichOneof("input")
    # chat input without max_tokens: the rest of the context, as OpenAI's chat API and vLLM do
    params = params_from_pb(req.params, default_max_tokens=None if kind == "chat" else 16)
    adapter = req.adapter or None
    if kind == "prompt":
        _require(bool(req.prompt), "prompt", Msg.EMPTY_PROMPT)
        return EngineRequest(request_id, prompt=req.prompt, params=params, adapter=adapter, priority=req.priority)
    if kind == "token_ids":
        _require(len(req.token_ids.ids) > 0, "token_ids", Msg.EMPTY_TOKEN_IDS)
        return EngineRequest(request_id, prompt_token_ids=list(req.token_ids.ids), params=params,
                             adapter=adapter, priority=req.priority)
    if kind == "chat":
        return EngineRequest(request_id, chat=chat_from_pb(req.chat), params=params, adapter=adapter,
                             priority=req.priority)
    raise InvalidRequestError("input", Msg.INPUT_MISSING)


def request_id_from_pb(request_id: str) -> str:
    """The caller's id after checking its shape, or a fresh one."""
    if not request_id:
        return uuid.uuid4().hex
    _require(len(request_id) <= MAX_REQUEST_ID_CHARS, "request_id",
             Msg.REQUEST_ID_TOO_LONG.format(limit=MAX_REQUEST_ID_CHARS, length=len(request_id)))
    ok = request_id.isascii() and request_id.isprintable() and " " not in request_id
    _require(ok, "request_id", Msg.REQUEST_ID_BAD_CHARS)
    return request_id


def params_from_pb(p: pb.SamplingParameters, default_max_tokens: int | None = 16) -> SamplingParams:
    """SamplingParams with the proto's defaults for unset optional fields (validated on build)."""
    def opt(name: str, default: Any) -> Any:
        return getattr(p, name) if p.HasField(name) else default

    return SamplingParams(
        max_tokens=opt("max_tokens", default_max_tokens), min_tokens=p.min_tokens, temperature=opt("temperature", 1.0),
        top_p=opt("top_p", 1.0), top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=opt("repetition_penalty", 1.0), presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, seed=opt("seed", None), stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids), include_stop_str_in_output=p.include_stop_str_in_output,
        ignore_eos=p.ignore_eos, logprobs=opt("logprobs", None), prompt_logprobs=opt("prompt_logprobs", None),
        skip_special_tokens=opt("skip_special_tokens", True), structured_outputs=structured_from_pb(p))


def chat_from_pb(chat: pb.ChatInput) -> ChatInput:
    """The chat input's messages, tools and template kwargs (rendered later, by the input step)."""
    _require(len(chat.messages) > 0, "chat.messages", Msg.EMPTY_MESSAGES)
    messages = [_message_from_pb(i, m) for i, m in enumerate(chat.messages)]
    tools = [_json_object(f"chat.tools_json[{i}]", t) for i, t in enumerate(chat.tools_json)] or None
    kwargs: dict[str, Any] = {}
    if chat.chat_template_kwargs_json:
        kwargs = _json_object("chat.chat_template_kwargs_json", chat.chat_template_kwargs_json)
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
        _require(not reserved, "chat.chat_template_kwargs_json", Msg.RESERVED_KWARGS.format(keys=reserved))
    add_generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    return ChatInput(messages, tools, kwargs or None, add_generation_prompt)


def _message_from_pb(index: int, m: pb.ChatMessage) -> dict[str, Any]:
    _require(m.role in ROLES, f"chat.messages[{index}].role",
             Msg.BAD_ROLE.value.format(role=m.role, roles=list(ROLES)))
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        message["name"] = m.name
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    if m.tool_calls_json:
        message["tool_calls"] = [_json_object(f"chat.messages[{index}].tool_calls_json[{j}]", c)
                                 for j, c in enumerate(m.tool_calls_json)]
    return message


def _json_object(field_name: str, text: str) -> dict[str, Any]:
    check_json_depth(field_name, text)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(field_name, Msg.BAD_JSON.format(error=exc)) from exc
    _require(isinstance(value, dict), field_name, Msg.NOT_JSON_OBJECT)
    return value


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(field_name, str(message))


# ---- to_pb -----------------------------------------------------------------------------------


def output_to_pb(out: RequestOutput, token_text: TokenText) -> pb.GenerateResponse:
    """One stream message from one engine delta; the final one carries reason, usage and timings."""
    msg = pb.GenerateResponse(request_id=out.request_id, text=out.new_text, token_ids=out.new_token_ids,
                              adapter_version=out.adapter_version or 0)
    if out.new_logprobs:
        msg.logprobs.extend(logprob_to_pb(lp, token_text) for lp in out.new_logprobs)
    if out.prompt_logprobs:
        msg.prompt_logprobs.extend(logprob_to_pb(lp, token_text) for lp in out.prompt_logprobs if lp is not None)
    if out.finished:
        _finish_to_pb(msg, out)
    return msg


def _finish_to_pb(msg: pb.GenerateResponse, out: RequestOutput) -> None:
    msg.finished = True
    msg.finish_reason = out.finish_reason or "stop"
    if isinstance(out.stop_reason, str):
        msg.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        msg.stop_token_id = out.stop_reason
    msg.usage.CopyFrom(usage_to_pb(out.usage))
    msg.timings.CopyFrom(timings_to_pb(out.timings))
    if out.error:
        msg.error = out.error


def logprob_to_pb(lp: Logprob, token_text: TokenText) -> pb.TokenLogprob:
    top = [pb.TopLogprob(token_id=t, token=token_text(t), logprob=v) for t, v in lp.top]
    return pb.TokenLogprob(token_id=lp.token_id, token=token_text(lp.token_id), logprob=lp.logprob,
                           rank=lp.rank, top=top)


def usage_to_pb(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    cached_tokens=u.cached_tokens)


def timings_to_pb(t: RequestTimings) -> pb.Timings:
    return pb.Timings(queue_time=t.queue_time, time_to_first_token=t.time_to_first_token,
                      e2e_latency=t.e2e_latency)


_STATES = {AdapterState.RESIDENT: pb.ADAPTER_STATE_RESIDENT, AdapterState.CACHED: pb.ADAPTER_STATE_CACHED,
           AdapterState.REGISTERED: pb.ADAPTER_STATE_REGISTERED}


def adapter_to_pb(info: AdapterInfo) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=info.name, version=info.version, source=info.source, rank=info.rank,
                          state=_STATES.get(info.state, pb.ADAPTER_STATE_UNSPECIFIED), pinned=info.pinned,
                          running_requests=info.running_requests, alpha=info.alpha,
                          target_modules=list(info.target_modules))
