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
