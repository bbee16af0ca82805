"""What a caller submits to the engine, and what the input step turns it into."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from loraplex.backend.sampling_params import SamplingParams


@dataclass
class ChatInput:
    """Chat messages, rendered with the model's template by the input step (never by the caller)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True


@dataclass
class EngineRequest:
    """One generation request, already converted from protobuf / OpenAI.

    Exactly one of ``prompt`` (text), ``prompt_token_ids`` and ``chat`` is set.
    ``request_id`` is given by the caller (the servicer assigns one at the edge
    when the client sent none). ``adapter`` None or "" = the base model.
    """

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    priority: int = 0  # lower runs first under the priority policy
    arrival_time: float = field(default_factory=time.monotonic)
    chat: ChatInput | None = None


@dataclass
class ProcessedRequest:
    """A request after the input step: token ids and checked limits; what the engine core receives."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against max_model_len
    adapter: str | None
    priority: int
    arrival_time: float
