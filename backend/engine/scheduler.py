"""Continuous batching with a per-step token budget, chunked prefill, preemption by
recompute, FCFS or priority order, and adapter admission. Pure Python: its one output is
``SchedulerOutput``.

Adapter admission goes through an ``AdapterGate`` (``lora.loader.AdapterLoader``): a request
whose adapter is not in a GPU slot yet waits in the queue while the gate loads it (started on
arrival, and each step for the adapters of the first waiting requests) and others go ahead,
preferring requests whose adapters are resident; but a request is never passed over by more than
``max_admission_bypass`` admissions nor for longer than ``max_admission_wait`` seconds: then no
one behind it is admitted until it is (counted in ``num_admissions_overdue``). Without a gate, at
most ``max_loras`` distinct adapters run at once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from loraplex.backend.engine.kv_cache import KVCacheManager
from loraplex.backend.engine.sequence import Sequence, Status
from loraplex.backend.sampling_params import SamplingParams
from loraplex.config import SchedulerConfig

PREFETCH_SCAN = 1024  # waiting requests looked at per step for the adapters to load next


class AdapterGate(Protocol):
    """Where adapter versions stand with the GPU slots, and how they get there (the engine's loader)."""

    def lookup(self, version: Any) -> None:
        """A request on ``version`` arrived (counts slot / host-cache hits)."""

    def prefetch(self, version: Any, inline: bool = False) -> None:
        """Start loading ``version`` into a slot unless it is there or on its way."""

    def admissible(self, version: Any, idle: bool) -> bool:
        """Requests on ``version`` may run in this step (``idle``: no request is running)."""

    def want(self, versions: Iterable[Any]) -> None:
        """The versions of the requests admitted next: keep them."""

    def activate(self, version: Any) -> None:
        """An admitted request runs on ``version``: its slot must stay."""

    def deactivate(self, version: Any) -> None:
        """A request running on ``version`` stopped (finished or preempted)."""

    def assign(self, versions: set[Any]) -> dict[Any, int]:
        """The GPU slot of each version of the step."""


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens [num_computed_tokens, num_computed_tokens + num_new_tokens) run this step
    samples: bool = field(init=False)  # the chunk reaches the end of the sequence's tokens: one is sampled

    def __post_init__(self) -> None:
        seq = self.seq
        self.samples = seq.num_computed_tokens + self.num_new_tokens == (
            len(seq.prompt_token_ids) + len(seq.output_token_ids) + seq.num_pending)


@dataclass(frozen=True, slots=True)
class NewRequestData:
    """A request the runner has not seen yet, or must rebuild after a preemption."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated before a preemption (recomputed, not resampled)
    params: SamplingParams
    early_stop_ids: list[int]  # never sampled before min_tokens: EOS (unless ignore_eos), stop token ids
    structured: Any  # the grammar matcher of a structured-output request (the engine advances it), or None


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's part of a step, as the runner sees it (plain values, no live objects)."""

    request_id: str
    start: int  # tokens [start, start + num_new_tokens) run this step
    num_new_tokens: int
    new_block_ids: list[int]  # KV blocks added since the runner last saw the request (all, for a new one)
    lora_slot: int  # GPU adapter slot, -1 = base model
    samples: bool  # the chunk reaches the end of the request's tokens: sample one
    new: NewRequestData | None  # set the first time the runner sees the request (and after preemption)


@dataclass
class SchedulerOutput:
    """One step. ``requests`` and ``finished_req_ids`` are the runner's whole input;
    ``scheduled`` and ``preempted`` are the engine's own bookkeeping."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    requests: list[ScheduledRequest] = field(default_factory=list)
    finished_req_ids: set[str] = field(default_factory=set)  # the runner drops their state

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int, max_loras: int,
                 gate: AdapterGate | None = None):
        self.config = config
        self.gate = gate
        self.finished_ids: set[str] = set()
        self.kv = kv
        self.max_model_len = max_model_len
        self.max_loras = max_loras
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._counter = itertools.count()
        self.num_preemptions = 0
        self.num_admissions_overdue = 0  # requests passed over past the bounds (then admitted first)

    # ---- queue
    def add(self, seq: Sequence) -> None:
        seq.arrival_index = next(self._counter)
        seq.status = Status.WAITING
        seq.waiting_since = time.monotonic()
        self.waiting.append(seq)
        self._sort_waiting()
        if self.gate is not None and seq.adapter is not None:
            self.gate.lookup(seq.adapter)
            if len(self.waiting) <= self.max_loras:  # prefetch on arrival (a long queue: as it comes near)
                self.gate.prefetch(seq.adapter, inline=not self.running)

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence and frees its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._deactivate(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.kv.free_seq(seq)
        self.finished_ids.add(seq.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.gate is not None and self.waiting:
            self._prefetch_next()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        self._describe_for_runner(out)
        return out

    def _describe_for_runner(self, out: SchedulerOutput) -> None:
        versions = {s.seq.adapter for s in out.scheduled if s.seq.adapter is not None}
        slots = self.gate.assign(versions) if versions and self.gate is not None else {}
        for item in out.scheduled:
            seq = item.seq
            new = None
            if seq.num_blocks_sent == 0:
                new = NewRequestData(list(seq.prompt_token_ids), list(seq.output_token_ids), seq.params,
                                     seq.early_stop_ids, seq.structured)
            block_ids = seq.block_ids[seq.num_blocks_sent:]
            seq.num_blocks_sent = len(seq.block_ids)
            slot = slots[seq.adapter] if seq.adapter is not None else -1
            out.requests.append(ScheduledRequest(seq.request_id, seq.num_computed_tokens, item.num_new_tokens,
                                                 block_ids, slot, item.samples, new))
        out.finished_req_ids, self.finished_ids = self.finished_ids, set()

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        running = Status.RUNNING
        for seq in list(self.running):
            if seq.status is not running or budget <= 0:
                continue
            num_out = len(seq.output_token_ids)
            if seq.num_pending and num_out + seq.num_pending >= seq.max_tokens:
                continue  # its last token is on the way: nothing more to compute
            n = min(len(seq.prompt_token_ids) + num_out + seq.num_pending - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq, n):
                victim = self._pick_victim()
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        return budget

    def _prefetch_next(self) -> None:
        """Loads the adapters of the first waiting requests (up to ``max_loras`` distinct ones), in
        queue order, and keeps them in their slots until admitted."""
        wanted: dict[Any, None] = {}
        for seq in itertools.islice(self.waiting, PREFETCH_SCAN):
            if seq.adapter is not None:
                wanted[seq.adapter] = None
                if len(wanted) >= self.max_loras:
                    break
        assert self.gate is not None
        self.gate.want(wanted)
        idle = not self.running
        for version in wanted:
            self.gate.prefetch(version, inline=idle)

    def _admissible(self, seq: Sequence, adapters: set[tuple[str, int]], idle: bool) -> bool:
        if seq.adapter_key is None:
            return True
        if self.gate is not None and not self.gate.admissible(seq.adapter, idle):
            return False  # its adapter is loading: others may go ahead
        return seq.adapter_key in adapters or len(adapters) < self.max_loras

    def _overdue(self, seq: Sequence) -> bool:
        """``seq`` has been passed over long enough: no one behind it may be admitted before it."""
        if not seq.admission_overdue and (seq.num_bypassed >= self.config.max_admission_bypass or
                                          time.monotonic() - seq.waiting_since >= self.config.max_admission_wait):
            seq.admission_overdue = True
            self.num_admissions_overdue += 1
        return seq.admission_overdue

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        adapters = {s.adapter_key for s in self.running if s.adapter_key is not None}
        idle = not self.running
        passed: list[tuple[Sequence, int]] = []  # (waiting request passed over, admissions before it was)
        admitted, cap = 0, None  # cap: admissions this step that keep every passed request within its bound
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs or admitted == cap:
                break
            if not self._admissible(seq, adapters, idle):
                if self._overdue(seq):
                    break
                passed.append((seq, admitted))
                left = admitted + self.config.max_admission_bypass - seq.num_bypassed
                cap = left if cap is None else min(cap, left)
                continue
            cached = self.kv.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            num_cached = len(cached) * self.kv.block_size
            n = seq.num_tokens - seq.num_computed_tokens - num_cached
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.kv.allocate(seq, n, cached):
                break
            self._admit(seq, num_cached)
            admitted += 1
            if seq.adapter_key is not None:
                adapters.add(seq.adapter_key)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        for seq, before in passed:
            seq.num_bypassed += admitted - before

    def _admit(self, seq: Sequence, num_cached: int) -> None:
        self.waiting.remove(seq)
        seq.num_computed_tokens += num_cached
        if seq.num_cached_tokens < 0:  # first admission: report prompt cache hits
            seq.num_cached_tokens = num_cached
            self.kv.record_prefix_lookup(seq.num_prompt_tokens, num_cached)
        seq.status = Status.RUNNING
        if not seq.timings.first_scheduled:
            seq.timings.first_scheduled = time.monotonic()
        self.running.append(seq)
        if self.gate is not None and seq.adapter is not None:
            self.gate.activate(seq.adapter)
            seq.adapter_active = True

    def _deactivate(self, seq: Sequence) -> None:
        if seq.adapter_active and self.gate is not None:
            self.gate.deactivate(seq.adapter)
        seq.adapter_active = False

    # ---- preemption
    def _pick_victim(self) -> Sequence:
        if self.config.policy == "priority":
            return max(self.running, key=lambda s: (s.priority, s.arrival_index))
        return self.running[-1]

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Preemption by recompute: drop the KV, keep the tokens, requeue at the front."""
        self.running.remove(seq)
        self._deactivate(seq)
        self.kv.free_seq(seq)
        seq.num_blocks_sent = 0
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.waiting_since, seq.num_bypassed, seq.admission_overdue = time.monotonic(), 0, False
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)
        self._sort_waiting()
        out.preempted.append(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]

    def _sort_waiting(self) -> None:
        if self.config.policy == "priority":
            self.waiting.sort(key=lambda s: (s.priority, s.arrival_index))
        else:
            self.waiting.sort(key=lambda s: s.arrival_index)

    # ---- after the launch
    def advance(self, out: SchedulerOutput) -> None:
        """The step is on the device: its tokens count as computed, each sample as one pending token,
        and newly full blocks of known tokens go to the prefix cache."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            item.seq.num_pending += item.samples
            self.kv.cache_full_blocks(item.seq)
