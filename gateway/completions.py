"""``POST /v1/completions``: prompts (text or token ids, one or many) → backend prompts;
choices in OpenAI's order (prompt-major), logprobs in the completions shape."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from loraplex.clients import GenerateResult, pb
from loraplex.gateway.endpoint import GenerationEndpoint, finish_reason, stop_reason
from loraplex.gateway.errors import bad_request
from loraplex.gateway.logprobs import completion_logprobs
from loraplex.gateway.protocol import CompletionRequest
from loraplex.gateway.responses import (
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionResponse,
)
from loraplex.gateway.serving import handle
from loraplex.gateway.state import GatewayState, Target
from loraplex.gateway.structured import constrain, constraint_of
from loraplex.gateway.translate import completion_requests


@dataclass
class _Choice:
    echo: str  # the prompt text still to prepend (echo=true), sent with the first delta
    offset: int = 0  # text_offset of the next token


class CompletionEndpoint(GenerationEndpoint):
    route = "/v1/completions"
    operation = "text_completion"
    id_prefix = "cmpl"
    chunk_type = CompletionChunk
    response_type = CompletionResponse
    req: CompletionRequest

    def __init__(self, req: CompletionRequest, target: Target, state: GatewayState, request_id: str) -> None:
        _check_echo(req)
        prompts = req.prompts()
        super().__init__(req, target, state, request_id, num_choices=len(prompts) * req.n, per_prompt=req.n)
        self.constraint = constraint_of(req)
        self._choices = [_Choice(echo=p if req.echo and isinstance(p, str) else "")
                         for p in prompts for _ in range(req.n)]

    def requests(self) -> list[pb.GenerateRequest]:
        return constrain(completion_requests(self.req, adapter=self.adapter, request_id=self.request_id),
                         self.constraint)

    def on_response(self, index: int, response: pb.GenerateResponse) -> list[str]:
        choice = self._choices[index]
        out: list[str] = []
        text = choice.echo + response.text
        if text or response.logprobs:
            logprobs = self._logprobs(choice, response.logprobs)
            choice.echo = ""
            out.append(self._chunk(index, text, logprobs))
        if response.finished:
            reason = self.finished(index, response.usage, finish_reason(response.finish_reason))
            out.append(self._chunk(index, "", None, reason))
        return out

    def _chunk(self, index: int, text: str, logprobs: CompletionLogprobs | None, reason: str | None = None) -> str:
        return self.chunk(CompletionChunkChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason))

    def _logprobs(self, choice: _Choice, entries: list[pb.TokenLogprob]) -> CompletionLogprobs | None:
        """This delta's logprobs; offsets count in the returned text (the echoed prompt included)."""
        if self.req.logprobs is None:
            return None
        out = completion_logprobs(entries, self.req.logprobs, choice.offset + len(choice.echo))
        choice.offset += len(choice.echo) + sum(len(e.token) for e in entries)
        return out

    def choice(self, index: int, result: GenerateResult) -> CompletionChoice:
        choice = self._choices[index]
        logprobs = self._logprobs(choice, result.logprobs)
        reason = self.finished(index, result.usage, finish_reason(result.finish_reason))
        return CompletionChoice(index=index, text=choice.echo + result.text, logprobs=logprobs,
                                finish_reason=reason, stop_reason=stop_reason(result))


def _check_echo(req: CompletionRequest) -> None:
    if not req.echo:
        return
    if req.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported by this server.", "echo",
                          "unsupported_value")
    if any(not isinstance(p, str) for p in req.prompts()):
        raise bad_request("echo is supported for text prompts only.", "echo", "unsupported_value")


async def create_completion(request: Request) -> Response:
    return await handle(request, CompletionRequest, CompletionEndpoint)
