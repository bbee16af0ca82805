"""Adapter descriptions shared by the registry, the engine and the servicer."""

from __future__ import annotations

from dataclasses import dataclass
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
