"""OpenAI requests → ``pb.GenerateRequest`` (one per choice: n > 1 fans out)."""

from __future__ import annotations

import json

from loraplex.clients import pb
from loraplex.gateway.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

_ROLE = {"developer": "system"}


def sampling(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None,
             index: int = 0) -> pb.SamplingParameters:
    """The shared sampling fields; choice ``index`` > 0 gets seed + index, so choices differ."""
    params = pb.SamplingParameters(
        min_tokens=req.min_tokens,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stop=req.stops,
        stop_token_ids=req.stop_token_ids or [],
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
    )
    _set_optional(params, "max_tokens", max_tokens)
    _set_optional(params, "temperature", req.temperature)
    _set_optional(params, "top_p", req.top_p)
    _set_optional(params, "repetition_penalty", req.repetition_penalty)
    _set_optional(params, "logprobs", logprobs)
    _set_optional(params, "skip_special_tokens", req.skip_special_tokens)
    if req.seed is not None:
        params.seed = (req.seed + index) % 2**63
    return params


def _set_optional(params: pb.SamplingParameters, name: str, value: object) -> None:
    if value is not None:
        setattr(params, name, value)


def chat_message(msg: ChatMessage) -> pb.ChatMessage:
    out = pb.ChatMessage(role=_ROLE.get(msg.role, msg.role), content=msg.text(), name=msg.name or "",
                         tool_call_id=msg.tool_call_id or "")
    for call in msg.tool_calls or []:
        out.tool_calls_json.append(json.dumps(call.model_dump(), ensure_ascii=False))
    return out


def chat_input(req: ChatCompletionRequest) -> pb.ChatInput:
    chat = pb.ChatInput(messages=[chat_message(m) for m in req.messages],
                        add_generation_prompt=req.add_generation_prompt)
    for tool in req.tools_for_template():
        chat.tools_json.append(json.dumps(tool.model_dump(exclude_none=True), ensure_ascii=False))
    if req.chat_template_kwargs:
        chat.chat_template_kwargs_json = json.dumps(req.chat_template_kwargs, ensure_ascii=False)
    return chat


def chat_requests(req: ChatCompletionRequest, *, adapter: str, request_id: str,
                  default_max_tokens: int | None = None) -> list[pb.GenerateRequest]:
    """One backend request per choice, ids ``<request_id>-<index>``."""
    chat = chat_input(req)
    max_tokens = req.max_output_tokens or default_max_tokens
    return [
        pb.GenerateRequest(
            request_id=f"{request_id}-{i}", adapter=adapter, chat=chat, priority=req.priority,
            params=sampling(req, max_tokens=max_tokens, logprobs=req.top_logprobs_count, index=i),
        )
        for i in range(req.n)
    ]


def completion_requests(req: CompletionRequest, *, adapter: str, request_id: str) -> list[pb.GenerateRequest]:
    """One backend request per (prompt, choice), in OpenAI's choice order (prompt-major)."""
    out: list[pb.GenerateRequest] = []
    for p, prompt in enumerate(req.prompts()):
        for i in range(req.n):
            index = p * req.n + i
            gen = pb.GenerateRequest(
                request_id=f"{request_id}-{index}", adapter=adapter, priority=req.priority,
                params=sampling(req, max_tokens=req.max_tokens, logprobs=req.logprobs, index=i),
            )
            if isinstance(prompt, str):
                gen.prompt = prompt
            else:
                gen.token_ids.ids.extend(prompt)
            out.append(gen)
    return out
