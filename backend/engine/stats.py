"""Counters and gauges the engine keeps; the metrics module reads them.

The step thread mutates one live ``EngineStats`` and, once per step, publishes
a copy (``snapshot``) that nobody mutates afterwards: readers on other threads
(or in the front-end process) take the published reference and never copy
live state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdapterResidency:
    """Where one registered adapter's weights are: level "gpu" (a slot), "cpu" (host cache) or "disk"."""

    name: str
    level: str
    pinned: bool
    rank: int


@dataclass
class EngineStats:
    # gauges
    num_waiting: int = 0
    num_running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0  # blocks held by requests (cached-but-free blocks do not count)
    lora_slots_total: int = 0
    lora_slots_used: int = 0
    adapters_resident: int = 0
    adapters_cached: int = 0
    adapters_registered: int = 0
    # counters (monotonic since start)
    num_steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found
    adapter_source_loads: int = 0  # adapter weights read from their source (disk, hub)
    adapter_source_load_seconds: float = 0.0
    adapter_slot_evictions: int = 0  # adapters evicted from GPU slots (not from the CPU cache)
    requests_by_adapter: dict[str, int] = field(default_factory=dict)
    tokens_by_adapter: dict[str, int] = field(default_factory=dict)
    last_step_started: float = 0.0  # monotonic; 0 = idle
    loop_alive: bool = False
    # for routers (vllm:lora_requests_info, vllm:lora_adapter_loaded): adapter names of the
    # running and waiting requests (sorted, no duplicates, base model left out), and every
    # registered adapter's residency (refreshed when the registry's counts change)
    running_adapter_names: tuple[str, ...] = ()
    waiting_adapter_names: tuple[str, ...] = ()
    adapter_residency: tuple[AdapterResidency, ...] = ()
    resident_adapters: tuple[str, ...] = ()  # names with a GPU slot, for load reports (routers)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    def snapshot(self) -> EngineStats:
        """A copy sharing nothing mutable with ``self`` (publish it; never mutate it)."""
        return dataclasses.replace(self, requests_by_adapter=dict(self.requests_by_adapter),
                                   tokens_by_adapter=dict(self.tokens_by_adapter))
