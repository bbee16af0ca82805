"""A request's state inside the engine (pure Python; no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from loraplex.backend.outputs import RequestTimings
from loraplex.backend.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request: its tokens, how many of them have KV computed, and its blocks.

    There is no prefill or decode phase: each step schedules some of the tokens
    in ``[num_computed_tokens, num_tokens)``; when they catch up, one token is sampled.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against max_model_len
    eos_token_id: int | None = None
    priority: int = 0
    arrival_index: int = 0  # FCFS order
    adapter_key: tuple[str, int] | None = None  # (name, version); None = base model
    adapter: Any = None  # the registry's AdapterVersion pinned by this request
    adapter_active: bool = False  # counted as running on its adapter (the gate's activate)
    waiting_since: float = 0.0  # monotonic; when it (re)entered the waiting queue
    num_bypassed: int = 0  # admissions of requests behind it while it waited for its adapter
    admission_overdue: bool = False  # passed over past the bounds: admitted before anyone behind it
    early_stop_ids: list[int] = field(default_factory=list)  # masked until min_tokens: EOS, stop token ids
    output_token_ids: list[int] = field(default_factory=list)
    num_pending: int = 0  # tokens sampled on the device whose values the host has not processed yet
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first schedule (-1 = not yet)
    block_ids: list[int] = field(default_factory=list)
    num_blocks_sent: int = 0  # block ids already described to the runner (0: it must (re)build the request)
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of full blocks of all_token_ids
    num_blocks_published: int = 0  # leading blocks already offered to the prefix cache
    status: Status = Status.WAITING
    num_preemptions: int = 0
    timings: RequestTimings = field(default_factory=RequestTimings)
    state: Any = None  # the engine's per-request output state (detokenizer, stop matcher, ...)
    structured: Any = None  # structured.RequestGrammar: the grammar matcher of a constrained request

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt, output and pending tokens: what the scheduler must have computed KV for."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]
