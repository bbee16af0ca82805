"""``POST /v1/chat/completions``: messages → backend chat input; output → message or chunks
(reasoning split off, hermes tool calls parsed, logprobs in the chat shape)."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from loraplex.clients import GenerateResult, pb
from loraplex.gateway.endpoint import GenerationEndpoint, finish_reason, stop_reason
from loraplex.gateway.logprobs import chat_logprobs
from loraplex.gateway.output import OutputParser, ParsedDelta, parse_whole
from loraplex.gateway.protocol import ChatCompletionRequest
from loraplex.gateway.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from loraplex.gateway.serving import handle
from loraplex.gateway.state import GatewayState, Target
from loraplex.gateway.structured import chat_constraint, constrain, declared_only
from loraplex.gateway.tool_parser import ParsedToolCall
from loraplex.gateway.translate import chat_requests


@dataclass
class _Choice:
    parser: OutputParser
    started: bool = False
    tool_calls: int = 0
    pending: list[pb.TokenLogprob] = field(default_factory=list)


class ChatEndpoint(GenerationEndpoint):
    route = "/v1/chat/completions"
    operation = "chat"
    id_prefix = "chatcmpl"
    chunk_type = ChatCompletionChunk
    response_type = ChatCompletionResponse
    req: ChatCompletionRequest

    def __init__(self, req: ChatCompletionRequest, target: Target, state: GatewayState, request_id: str) -> None:
        super().__init__(req, target, state, request_id, num_choices=req.n, per_prompt=req.n)
        self.constraint = chat_constraint(req)  # response_format, structured_outputs, forced tool calls
        self._choices = [_Choice(self._parser()) for _ in range(req.n)]

    def _parser(self) -> OutputParser:
        tools_active = bool(self.req.tools_for_template())
        return OutputParser(self.state.reasoning_parser(self.req.chat_template_kwargs),
                            declared_only(self.state.tool_parser(tools_active), self.req.tool_names()))

    def requests(self) -> list[pb.GenerateRequest]:
        return constrain(chat_requests(self.req, adapter=self.adapter, request_id=self.request_id), self.constraint)

    # ---- streaming ----

    def on_response(self, index: int, response: pb.GenerateResponse) -> list[str]:
        choice = self._choices[index]
        out: list[str] = []
        if not choice.started:
            choice.started = True
            out.append(self._chunk(index, DeltaMessage(role="assistant", content="")))
        parsed = choice.parser.feed(response.text)
        if response.finished:
            parsed.extend(choice.parser.flush())
        choice.pending.extend(response.logprobs)
        if parsed:
            out.append(self._chunk(index, self._delta(choice, parsed), self._take_logprobs(choice)))
        if response.finished:
            reason = self.finished(index, response.usage,
                                   finish_reason(response.finish_reason, bool(choice.parser.tool_calls)))
            out.append(self._chunk(index, DeltaMessage(), self._take_logprobs(choice), reason))
        return out

    def _chunk(self, index: int, delta: DeltaMessage, logprobs: ChatLogprobs | None = None,
               reason: str | None = None) -> str:
        return self.chunk(ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason))

    def _delta(self, choice: _Choice, parsed: ParsedDelta) -> DeltaMessage:
        calls = []
        for call in parsed.tool_calls:
            calls.append(DeltaToolCall(index=choice.tool_calls, id=call.id, type="function",
                                       function=DeltaFunctionCall(name=call.name, arguments=call.arguments)))
            choice.tool_calls += 1
        return DeltaMessage(reasoning_content=parsed.reasoning or None, content=parsed.content or None,
                            tool_calls=calls or None)

    def _take_logprobs(self, choice: _Choice) -> ChatLogprobs | None:
        if not self.req.logprobs or not choice.pending:
            return None
        entries, choice.pending = choice.pending, []
        return chat_logprobs(entries, self.req.top_logprobs or 0)

    # ---- whole answer ----

    def choice(self, index: int, result: GenerateResult) -> ChatChoice:
        parser = self._parser()
        parsed = parse_whole(parser, result.text)
        content: str | None = parsed.content
        if parsed.tool_calls and not parsed.content.strip():
            content = None
        message = ChatMessageOut(content=content, reasoning_content=parsed.reasoning if parser.saw_reasoning else None,
                                 tool_calls=[_tool_call(c) for c in parsed.tool_calls] or None)
        logprobs = chat_logprobs(result.logprobs, self.req.top_logprobs or 0) if self.req.logprobs else None
        reason = self.finished(index, result.usage, finish_reason(result.finish_reason, bool(parsed.tool_calls)))
        return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=reason,
                          stop_reason=stop_reason(result))


def _tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


async def create_chat_completion(request: Request) -> Response:
    return await handle(request, ChatCompletionRequest, ChatEndpoint)
