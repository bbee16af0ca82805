"""What the two generation endpoints share: ids, per-choice usage, the chunk and response
envelopes, OpenAI's finish and stop reasons, and the span's GenAI attributes.

A subclass says how its request becomes backend calls (``requests``), how one backend
message becomes SSE chunks (``on_response``) and how one folded result becomes a choice
(``choice``)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel

from loraplex.clients import GenerateResult, pb
from loraplex.gateway import sse
from loraplex.gateway.errors import OpenAIError
from loraplex.gateway.protocol import SamplingFields
from loraplex.gateway.responses import Usage, new_id, now
from loraplex.gateway.state import GatewayState, Target
from loraplex.gateway.structured import Constraint
from loraplex.gateway.tracing import PROVIDER_NAME, RequestSpan


def check_not_aborted(response: pb.GenerateResponse) -> None:
    """An aborted backend request is the caller's error, not a finish reason."""
    if response.finished and response.finish_reason == "abort":
        raise OpenAIError(503, response.error or "The backend aborted the request (it may be shutting down).",
                          code="request_aborted")


def finish_reason(reason: str, called_tools: bool = False) -> str:
    """The backend's reason in OpenAI's terms."""
    if called_tools and reason == "stop":
        return "tool_calls"
    return reason or "stop"


def stop_reason(result: GenerateResult | pb.GenerateResponse) -> str | int | None:
    """vLLM's ``stop_reason``: the stop string or stop token that ended the choice."""
    if result.stop_string:
        return result.stop_string
    if isinstance(result, pb.GenerateResponse):
        return result.stop_token_id if result.HasField("stop_token_id") else None
    return result.stop_token_id


def total_usage(usages: list[pb.Usage | None], per_prompt: int) -> Usage:
    """Prompt tokens once per prompt (choices of one prompt share it), completion tokens summed."""
    total = Usage()
    for i, u in enumerate(usages):
        if u is None:
            continue
        first = i % per_prompt == 0
        total.add(u.prompt_tokens if first else 0, u.completion_tokens, u.cached_tokens if first else 0)
    if total.prompt_tokens_details is None:
        total.add(0, 0, 0)
    return total


class GenerationEndpoint:
    """One OpenAI generation request's translation, both ways."""

    route: ClassVar[str]
    operation: ClassVar[str]  # gen_ai.operation.name
    id_prefix: ClassVar[str]
    chunk_type: ClassVar[type[BaseModel]]
    response_type: ClassVar[type[BaseModel]]

    def __init__(self, req: SamplingFields, target: Target, state: GatewayState, request_id: str,
                 num_choices: int, per_prompt: int) -> None:
        self.req = req
        self.model = target.model
        self.adapter = target.adapter
        self.stream = req.stream
        self.request_id = request_id  # the backend request ids are "<request_id>-<choice>"
        self.id = new_id(self.id_prefix)
        self.created = now()
        self.state = state
        self.constraint: Constraint | None = None  # structured output the subclass asks for
        self.usages: list[pb.Usage | None] = [None] * num_choices
        self.reasons: list[str | None] = [None] * num_choices
        self._per_prompt = per_prompt

    # ---- what a subclass says ----

    def requests(self) -> list[pb.GenerateRequest]:
        raise NotImplementedError

    def on_response(self, index: int, response: pb.GenerateResponse) -> list[str]:
        """One backend message of choice ``index`` as SSE events."""
        raise NotImplementedError

    def choice(self, index: int, result: GenerateResult) -> BaseModel:
        raise NotImplementedError

    # ---- shared ----

    def finished(self, index: int, usage: pb.Usage, reason: str) -> str:
        """Records a choice's end; returns ``reason``."""
        self.usages[index] = usage
        self.reasons[index] = reason
        return reason

    def chunk(self, choice: BaseModel) -> str:
        body = self.chunk_type(id=self.id, created=self.created, model=self.model, choices=[choice])
        return sse.event(body, exclude=None if self.req.include_usage else {"usage"})

    def stream_end(self) -> list[str]:
        if not self.req.include_usage:
            return []
        body = self.chunk_type(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())
        return [sse.event(body)]

    def response(self, results: list[GenerateResult]) -> BaseModel:
        choices = [self.choice(i, r) for i, r in enumerate(results)]
        return self.response_type(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=self.usage())

    def usage(self) -> Usage:
        return total_usage(self.usages, per_prompt=self._per_prompt)

    def annotate(self, span: RequestSpan) -> None:
        """The GenAI attributes known once the answer is complete."""
        usage = self.usage()
        attrs: dict[str, Any] = {
            "gen_ai.response.id": self.id, "gen_ai.response.model": self.model,
            "gen_ai.response.finish_reasons": [r for r in self.reasons if r is not None],
            "gen_ai.usage.input_tokens": usage.prompt_tokens, "gen_ai.usage.output_tokens": usage.completion_tokens,
        }
        for key, value in attrs.items():
            span.set(key, value)

    def start_span(self, span: RequestSpan) -> None:
        span.set("gen_ai.operation.name", self.operation)
        span.set("gen_ai.provider.name", PROVIDER_NAME)
        span.set("gen_ai.request.model", self.model)
