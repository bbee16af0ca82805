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
    adapter_slot_lookups: int = 0  # requests on an adapter, looked up on arrival
    adapter_slot_hits: int = 0  # ... whose adapter was in a GPU slot
    adapter_cpu_lookups: int = 0  # ... whose adapter was in no GPU slot
    adapter_cpu_hits: int = 0  # ... of those, whose weights were in host memory (else read from the source)
    adapter_admissions_overdue: int = 0  # requests passed over past the admission bounds while their adapter loaded
    adapter_loads_in_flight: int = 0  # gauge: adapters loading in the background (source read or slot write)
    # (stage, counts per bucket of lora.types.LOAD_BUCKETS then +Inf, sum of seconds); stage "source" = file
    # read into host memory, "slot" = host memory into a GPU slot (claim to write complete)
    adapter_load_times: tuple[tuple[str, tuple[int, ...], float], ...] = ()
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

    @property
    def adapter_slot_hit_ratio(self) -> float:
        """Share of requests on an adapter that found it in a GPU slot on arrival (0 before any)."""
        return self.adapter_slot_hits / self.adapter_slot_lookups if self.adapter_slot_lookups else 0.0

    @property
    def adapter_cpu_hit_ratio(self) -> float:
        """Of the requests whose adapter was in no slot, the share that found it in host memory."""
        return self.adapter_cpu_hits / self.adapter_cpu_lookups if self.adapter_cpu_lookups else 0.0

    def snapshot(self, previous: EngineStats | None = None) -> EngineStats:
        """A copy sharing nothing mutable with ``self`` (publish it; never mutate it). With ``previous``
        (a published snapshot) the per-adapter counters are the previous ones, as they were then: a
        copy per step would grow with the number of adapters ever used."""
        if previous is not None:  # published, so never mutated: shared
            return dataclasses.replace(self, requests_by_adapter=previous.requests_by_adapter,
                                       tokens_by_adapter=previous.tokens_by_adapter)
        return dataclasses.replace(self, requests_by_adapter=dict(self.requests_by_adapter),
                                   tokens_by_adapter=dict(self.tokens_by_adapter))
