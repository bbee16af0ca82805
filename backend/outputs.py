"""What the engine hands back: one ``RequestOutput`` per request per step (a delta)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One position's log-probabilities: the chosen token and the top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class RequestTimings:
    """Monotonic seconds (time.monotonic) of a request's milestones; 0 = not yet."""

    arrival: float = 0.0
    first_scheduled: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    finished: float = 0.0

    @property
    def queue_time(self) -> float:
        return max(0.0, self.first_scheduled - self.arrival) if self.first_scheduled else 0.0

    @property
    def time_to_first_token(self) -> float:
        return max(0.0, self.first_token - self.arrival) if self.first_token else 0.0

    @property
    def e2e_latency(self) -> float:
        return max(0.0, self.finished - self.arrival) if self.finished else 0.0


@dataclass
class RequestOutput:
    """A delta of one request's output. The last one has ``finished=True``."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    new_logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None  # only on the first delta
    usage: Usage = field(default_factory=Usage)
    timings: RequestTimings = field(default_factory=RequestTimings)
    adapter: str | None = None
    adapter_version: int | None = None
    error: str | None = None  # set when finish_reason == "abort" because of an engine error


@dataclass
class CompletionOutput:
    """One finished request from ``LLM.generate``."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    usage: Usage
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None
    adapter: str | None = None
