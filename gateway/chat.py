"""``POST /v1/chat/completions``: messages → backend chat input; output → message or chunks
(reasoning split off, hermes tool calls parsed, logprobs in the chat shape)."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from loraplex.clients import pb
from loraplex.gateway import sse
from loraplex.gateway.backend import Folded
from loraplex.gateway.errors import OpenAIError
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
    Usage,
    new_id,
    now,
)
from loraplex.gateway.security import read_json
from loraplex.gateway.serving import respond, total_usage, validate
from loraplex.gateway.state import GatewayState, Target
from loraplex.gateway.structured import chat_constraint, constrain, declared_only, relabel_errors
from loraplex.gateway.tool_parser import ParsedToolCall
from loraplex.gateway.translate import chat_requests

ROUTE = "/v1/chat/completions"


def finish_reason(response: pb.GenerateResponse, called_tools: bool) -> str:
    """The backend's reason in OpenAI's terms; an aborted request is an error."""
    if response.finish_reason == "abort":
        raise OpenAIError(503, response.error or "The backend aborted the request (it may be shutting down).",
                          code="request_aborted")
    if called_tools and response.finish_reason == "stop":
        return "tool_calls"
    return response.finish_reason or "stop"


def stop_reason(response: pb.GenerateResponse) -> str | int | None:
    if response.stop_string:
        return response.stop_string
    return response.stop_token_id if response.HasField("stop_token_id") else None


@dataclass
class _Choice:
    parser: OutputParser
    started: bool = False
    tool_calls: int = 0
    pending: list[pb.TokenLogprob] = field(default_factory=list)
    usage: pb.Usage | None = None


class ChatEndpoint:
    route = ROUTE

    def __init__(self, req: ChatCompletionRequest, target: Target, state: GatewayState) -> None:
        self.req = req
        self.model = target.model
        self.adapter = target.adapter
        self.stream = req.stream
        self.id = new_id("chatcmpl")
        self.created = now()
        self._state = state
        self.constraint = chat_constraint(req)  # response_format, structured_outputs, forced tool calls
        self._choices = [_Choice(self._parser()) for _ in range(req.n)]

    def _parser(self) -> OutputParser:
        tools_active = bool(self.req.tools_for_template())
        return OutputParser(self._state.reasoning_parser(self.req.chat_template_kwargs),
                            declared_only(self._state.tool_parser(tools_active), self.req.tool_names()))

    def requests(self) -> list[pb.GenerateRequest]:
        return constrain(chat_requests(self.req, adapter=self.adapter, request_id=self.id), self.constraint)

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
            reason = finish_reason(response, bool(choice.parser.tool_calls))
            choice.usage = response.usage
            out.append(self._chunk(index, DeltaMessage(), self._take_logprobs(choice), reason))
        return out

    def stream_end(self) -> list[str]:
        if not self.req.include_usage:
            return []
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                    usage=self.usage())
        return [sse.event(chunk)]

    def _chunk(self, index: int, delta: DeltaMessage, logprobs: ChatLogprobs | None = None,
               reason: str | None = None) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        return sse.event(chunk, exclude=None if self.req.include_usage else {"usage"})

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

    def response(self, results: list[Folded]) -> ChatCompletionResponse:
        choices = [self._choice(i, r) for i, r in enumerate(results)]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=self.usage())

    def _choice(self, index: int, result: Folded) -> ChatChoice:
        parser = self._parser()
        parsed = parse_whole(parser, result.text)
        self._choices[index].usage = result.final.usage
        content: str | None = parsed.content
        if parsed.tool_calls and not parsed.content.strip():
            content = None
        message = ChatMessageOut(content=content, reasoning_content=parsed.reasoning if parser.saw_reasoning else None,
                                 tool_calls=[_tool_call(c) for c in parsed.tool_calls] or None)
        logprobs = chat_logprobs(result.logprobs, self.req.top_logprobs or 0) if self.req.logprobs else None
        return ChatChoice(index=index, message=message, logprobs=logprobs,
                          finish_reason=finish_reason(result.final, bool(parsed.tool_calls)),
                          stop_reason=stop_reason(result.final))

    def usage(self) -> Usage:
        return total_usage([c.usage for c in self._choices], per_prompt=len(self._choices))


def _tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


async def create_chat_completion(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    span = state.span(f"POST {ROUTE}", request.headers)
    try:
        req = validate(ChatCompletionRequest, await read_json(request, state.config.max_request_bytes))
        target = await state.target(req.model)
        span.set("gen_ai.request.model", target.model)
        endpoint = ChatEndpoint(req, target, state)
        with relabel_errors(endpoint.constraint):
            return await respond(request, state, endpoint, span)
    except OpenAIError as err:
        span.end(err.status, err.message)
        raise
    except Exception as exc:
        span.end(500, repr(exc))
        raise
