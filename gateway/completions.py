"""``POST /v1/completions``: prompts (text or token ids, one or many) → backend prompts;
choices in OpenAI's order (prompt-major), logprobs in the completions shape."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from loraplex.clients import pb
from loraplex.gateway import sse
from loraplex.gateway.backend import Folded
from loraplex.gateway.chat import finish_reason, stop_reason
from loraplex.gateway.errors import OpenAIError, bad_request
from loraplex.gateway.logprobs import completion_logprobs
from loraplex.gateway.protocol import CompletionRequest
from loraplex.gateway.responses import (
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
    new_id,
    now,
)
from loraplex.gateway.security import read_json
from loraplex.gateway.serving import respond, total_usage, validate
from loraplex.gateway.state import GatewayState, Target
from loraplex.gateway.structured import constrain, constraint_of, relabel_errors
from loraplex.gateway.translate import completion_requests

ROUTE = "/v1/completions"


@dataclass
class _Choice:
    echo: str  # the prompt text still to prepend (echo=true), sent with the first delta
    offset: int = 0  # text_offset of the next token
    usage: pb.Usage | None = None


class CompletionEndpoint:
    route = ROUTE

    def __init__(self, req: CompletionRequest, target: Target) -> None:
        _check_echo(req)
        self.req = req
        self.model = target.model
        self.adapter = target.adapter
        self.stream = req.stream
        self.id = new_id("cmpl")
        self.created = now()
        self.constraint = constraint_of(req)
        prompts = req.prompts()
        self._choices = [_Choice(echo=p if req.echo and isinstance(p, str) else "")
                         for p in prompts for _ in range(req.n)]

    def requests(self) -> list[pb.GenerateRequest]:
        return constrain(completion_requests(self.req, adapter=self.adapter, request_id=self.id), self.constraint)

    def on_response(self, index: int, response: pb.GenerateResponse) -> list[str]:
        choice = self._choices[index]
        out: list[str] = []
        text = choice.echo + response.text
        if text or response.logprobs:
            logprobs = self._logprobs(choice, response.logprobs)
            choice.echo = ""
            out.append(self._chunk(index, text, logprobs))
        if response.finished:
            choice.usage = response.usage
            out.append(self._chunk(index, "", None, finish_reason(response, False)))
        return out

    def stream_end(self) -> list[str]:
        if not self.req.include_usage:
            return []
        chunk = CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())
        return [sse.event(chunk)]

    def _chunk(self, index: int, text: str, logprobs: CompletionLogprobs | None, reason: str | None = None) -> str:
        choice = CompletionChunkChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
        chunk = CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        return sse.event(chunk, exclude=None if self.req.include_usage else {"usage"})

    def _logprobs(self, choice: _Choice, entries: list[pb.TokenLogprob]) -> CompletionLogprobs | None:
        """This delta's logprobs; offsets count in the returned text (the echoed prompt included)."""
        if self.req.logprobs is None:
            return None
        out = completion_logprobs(entries, self.req.logprobs, choice.offset + len(choice.echo))
        choice.offset += len(choice.echo) + sum(len(e.token) for e in entries)
        return out

    def response(self, results: list[Folded]) -> CompletionResponse:
        choices = [self._choice(i, r) for i, r in enumerate(results)]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=self.usage())

    def _choice(self, index: int, result: Folded) -> CompletionChoice:
        choice = self._choices[index]
        choice.usage = result.final.usage
        logprobs = self._logprobs(choice, result.logprobs)
        return CompletionChoice(index=index, text=choice.echo + result.text, logprobs=logprobs,
                                finish_reason=finish_reason(result.final, False), stop_reason=stop_reason(result.final))

    def usage(self) -> Usage:
        return total_usage([c.usage for c in self._choices], per_prompt=self.req.n)


def _check_echo(req: CompletionRequest) -> None:
    if not req.echo:
        return
    if req.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported by this server.", "echo",
                          "unsupported_value")
    if any(not isinstance(p, str) for p in req.prompts()):
        raise bad_request("echo is supported for text prompts only.", "echo", "unsupported_value")


async def create_completion(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    span = state.span(f"POST {ROUTE}", request.headers)
    try:
        req = validate(CompletionRequest, await read_json(request, state.config.max_request_bytes))
        target = await state.target(req.model)
        span.set("gen_ai.request.model", target.model)
        endpoint = CompletionEndpoint(req, target)
        with relabel_errors(endpoint.constraint):
            return await respond(request, state, endpoint, span)
    except OpenAIError as err:
        span.end(err.status, err.message)
        raise
    except Exception as exc:
        span.end(500, repr(exc))
        raise
