"""Adapter descriptions shared by the registry, the engine and the servicer."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import StrEnum


class AdapterState(StrEnum):
    RESIDENT = "resident"  # weights in a GPU slot
    CACHED = "cached"  # weights in host memory
    REGISTERED = "registered"  # known, weights only at the source


@dataclass
class AdapterInfo:
    name: str
    version: int
    source: str
    rank: int
    state: AdapterState
    pinned: bool
    running_requests: int
    alpha: float = 0.0
    target_modules: tuple[str, ...] = ()


# The one packed-modules table: engine linear -> (decoder-layer block that holds it, the HF projections
# fused into it, in slice order). The model loader, the slot layout and the PEFT key mapping read it.
PACKED_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o_proj": ("self_attn", ("o_proj",)),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
    "down_proj": ("mlp", ("down_proj",)),
}


class SlotStatus(StrEnum):
    """Where a version stands with the GPU slots."""

    NONE = "none"  # in no slot
    WRITING = "writing"  # a slot is reserved for it and its weights are being written
    ENQUEUED = "enqueued"  # the write is enqueued on the fill stream, not known complete yet (CUDA)
    READY = "ready"  # complete: steps may read it


# Upper bounds (seconds) of the adapter load-time histogram's buckets; a last one is +Inf.
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class LoadTimes:
    """An exact histogram of load durations: one count per bucket of ``LOAD_BUCKETS`` (then +Inf)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LOAD_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LOAD_BUCKETS, seconds)] += 1
        self.total += seconds

    def frozen(self) -> tuple[tuple[int, ...], float]:
        """``(counts per bucket, sum of seconds)``: an immutable copy for stats snapshots."""
        return tuple(self.counts), self.total
