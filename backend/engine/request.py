"""What a caller submits to the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loraplex.backend.sampling_params import SamplingParams


@dataclass
class EngineRequest:
    """One generation request, already converted from protobuf / OpenAI.

    Exactly one of ``prompt`` (text, tokenized by the engine) and
    ``prompt_token_ids`` is set. ``adapter`` None or "" = the base model.
    """

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    priority: int = 0  # lower runs first under the priority policy
    arrival_time: float = field(default_factory=time.monotonic)
