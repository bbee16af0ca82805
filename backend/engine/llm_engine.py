"""The synchronous engine core: add a request, abort it, step.

``step()`` = ``schedule()`` -> ``runner.launch()`` -> ``advance()``, then the output
processing of the step before (overlapped with this one's device work); it returns one
``RequestOutput`` delta per request that produced something. Not thread-safe: the async engine calls it from one thread.

Adapters load in the background (``lora.loader``): a request enters the queue at once and waits
there for its adapter while others step; a load that fails ends only the requests waiting on
it, each with a typed error (``take_failures``).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch

from loraplex.backend.engine.input_processor import InputProcessor
from loraplex.backend.engine.kv_cache import KVCacheManager
from loraplex.backend.engine.output import OutputState, append_token, flush_text, make_output
from loraplex.backend.engine.request import ChatInput, EngineRequest, ProcessedRequest
from loraplex.backend.engine.runner import ModelRunner, StepHandle
from loraplex.backend.engine.scheduler import Scheduler, SchedulerOutput
from loraplex.backend.engine.sequence import Sequence, Status
from loraplex.backend.engine.setup import EngineParts, build_engine_parts, capture_tokens
from loraplex.backend.engine.stats import AdapterResidency, EngineStats
from loraplex.backend.engine.structured import StructuredOutputs, after_token
from loraplex.backend.outputs import RequestOutput
from loraplex.config import EngineConfig
from loraplex.errors import InvalidRequestError, LoraplexError
from loraplex.lora.loader import AdapterLoader
from loraplex.lora.types import AdapterState

log = logging.getLogger(__name__)

ADAPTER_COUNTS_SECONDS = 0.25  # how stale the adapter gauges and per-adapter counters may get while stepping
LOAD_WAIT_SECONDS = 0.01  # longest sleep of a step with nothing to run while adapters load


class LLMEngine:
    @staticmethod
    def create(config: EngineConfig) -> LLMEngine:
        """The engine for ``config``: with tensor_parallel_size > 1 the model runs in worker processes."""
        if config.tensor_parallel_size > 1:
            from loraplex.backend.distributed.executor import TPEngine

            return TPEngine(config)
        return LLMEngine(config)

    def __init__(self, config: EngineConfig):
        self.config = config
        parts: EngineParts = build_engine_parts(config)
        self.parts = parts
        self.model_name = parts.model_name
        self.tokenizer = parts.tokenizer
        self.max_model_len = parts.max_model_len
        self.vocab_size = parts.model.spec.vocab_size
        self.eos_ids = parts.eos_ids
        self.adapters = parts.adapters  # lora.registry.AdapterRegistry or None
        self.kv = KVCacheManager(parts.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.loader = AdapterLoader(self.adapters, config.lora.adapter_load_threads) \
            if self.adapters is not None else None
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, config.lora.max_loras, self.loader)
        self._failed: list[tuple[str, LoraplexError]] = []  # requests whose adapter failed to load
        self.runner = parts.runner or ModelRunner(  # parts.runner: tensor parallelism's executor
            parts.model, parts.num_blocks, config.cache.block_size, parts.dtype, parts.device, config.model.seed,
            cuda_graphs=not config.model.enforce_eager, max_model_len=self.max_model_len,
            max_num_seqs=config.scheduler.max_num_seqs, with_lora=self.adapters is not None,
            max_capture_tokens=capture_tokens(config))
        self.seqs: dict[str, Sequence] = {}
        self.overlap = config.scheduler.async_scheduling
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None  # launched, outputs not processed
        self.input_processor = InputProcessor(self.tokenizer, self.model_name, self.max_model_len, self.vocab_size)
        self.stats = EngineStats(kv_blocks_total=parts.num_blocks)  # live; the step thread's own
        self.snapshot = self.stats.snapshot()  # published once per step; never mutated
        self._adapter_counts_at = -ADAPTER_COUNTS_SECONDS
        self._residency_key: tuple[Any, ...] = ()
        self._update_stats()  # routers read slots and preloaded adapters before the first request
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_ids)
        if self.device.type == "cuda" and parts.runner is None:
            self.structured.warm_up(self.device)  # the mask kernel compiled now, not at the first request
        tune_gc()

    @property
    def device(self) -> torch.device:
        return self.parts.device

    # ---- requests
    def make_sequence(self, proc: ProcessedRequest, final_only: bool = False) -> Sequence:
        """A sequence for a processed request, its adapter version pinned (thread-safe; reads adapter
        files on first use of an ``adapter_dir`` name, so never call it on the step thread). Weights
        evicted from host memory are read back in the background once the request is queued.
        ``final_only``: one output when it finishes, none per token (the offline API's mode; streaming
        requests and grammar-constrained ones stream)."""
        grammar = self.structured.request_grammar(proc.params)  # compiled (or cached) before any work is queued
        seq = Sequence(request_id=proc.request_id, prompt_token_ids=proc.prompt_token_ids, params=proc.params,
                       max_tokens=proc.max_tokens, priority=proc.priority, structured=grammar)
        seq.timings.arrival = proc.arrival_time
        if proc.adapter:
            if self.adapters is None:
                raise InvalidRequestError("adapter", "LoRA is disabled on this server")
            seq.adapter = self.adapters.acquire(proc.adapter, read=False)
            seq.adapter_key = seq.adapter.key
        seq.state = OutputState.create(seq, self.tokenizer, self.eos_ids, final_only and grammar is None)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:
            self.release_sequence(seq)
            raise InvalidRequestError("request_id", f"{seq.request_id!r} is already running")
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)
        self.stats.prompt_tokens += seq.num_prompt_tokens
        name = seq.adapter_key[0] if seq.adapter_key else ""
        self.stats.requests_by_adapter[name] = self.stats.requests_by_adapter.get(name, 0) + 1

    def add_request(self, req: EngineRequest) -> str:
        """Input step + sequence + queue, in the caller's thread (the offline API)."""
        seq = self.make_sequence(self.input_processor.process(req))
        self.add_sequence(seq)
        return seq.request_id

    def abort(self, request_id: str, error: str | None = None) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        out = make_output(seq, [], flush_text(seq.state) if error is None else "", None, "abort", error=error)
        self._finish(seq)
        self._update_stats()  # the engine may go idle now: gauges must not keep the aborted request
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- one step
    def step(self) -> list[RequestOutput]:
        """Schedules and launches step N, then processes step N-1's tokens while the device runs N.

        When step N's tokens stay on the device (greedy rows), its outputs are processed in the next
        call, so the host work of one step overlaps the device work of the next (vLLM's async
        scheduling); the next schedule counts each such token as pending.
        """
        self.stats.last_step_started = time.monotonic()
        if self.loader is not None and self.loader.has_failures:
            self._fail_unloadable()
        sched = self.scheduler.schedule()
        handle: StepHandle | None = None
        if not sched.is_empty:
            handle = self.runner.launch(sched, defer=self.overlap)
            self.scheduler.advance(sched)
        outputs: list[RequestOutput] = []
        if self._in_flight is not None:
            outputs += self._process(*self._in_flight)
            self._in_flight = None
        elif handle is None and self.scheduler.waiting and self.loader is not None:
            self.loader.wait(LOAD_WAIT_SECONDS)  # everything waits on adapter loads: do not spin
        if handle is not None:
            handle.complete()  # grammar-constrained sampling, now that the matchers saw the last tokens
            if handle.overlappable and self.overlap:
                self._in_flight = (sched, handle)
            else:
                outputs += self._process(sched, handle)
        self.stats.num_steps += 1
        self._update_stats()
        self.stats.last_step_started = 0.0
        return outputs

    def _fail_unloadable(self) -> None:
        """Ends the waiting requests of each version whose background load failed."""
        assert self.loader is not None
        for version, error in self.loader.take_failures():
            for seq in [s for s in self.scheduler.waiting if s.adapter is version]:
                self._finish(seq)
                self._failed.append((seq.request_id, error))

    def take_failures(self) -> list[tuple[str, LoraplexError]]:
        """Requests ended since the last call because their adapter failed to load, with the error."""
        failed, self._failed = self._failed, []
        return failed

    def _process(self, sched: SchedulerOutput, handle: StepHandle) -> list[RequestOutput]:
        result = handle.result()
        for rid, lps in result.prompt_logprobs.items():
            seq = self.seqs.get(rid)
            if seq is not None and seq.state.prompt_logprobs is not None:
                seq.state.prompt_logprobs.extend(lps)
        outputs = []
        for item in sched.scheduled:
            seq = item.seq
            if not item.samples:
                continue
            seq.num_pending -= 1
            if seq.status is Status.FINISHED:  # aborted, or finished by the step before (this token is surplus)
                continue
            token = result.sampled[seq.request_id]
            out = append_token(seq, token, result.logprobs.get(seq.request_id), self.eos_ids, self.max_model_len)
            name = seq.adapter_key[0] if seq.adapter_key else ""
            self.stats.tokens_by_adapter[name] = self.stats.tokens_by_adapter.get(name, 0) + 1
            self.stats.generation_tokens += 1
            if out is not None:  # None: final-only and not finished
                after_token(seq, out)  # advances its grammar matcher; a completed grammar ends the request
                outputs.append(out)
                if out.finished:
                    self._finish(seq)
                    continue
            self.kv.cache_full_blocks(seq)
        return outputs

    def _finish(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)
        self.release_sequence(seq)

    def release_sequence(self, seq: Sequence) -> None:
        """Unpins the adapter version a sequence holds (for sequences that never ran or are done)."""
        if seq.adapter is not None and self.adapters is not None:
            self.adapters.release(seq.adapter)
            seq.adapter = None

    def _update_stats(self) -> None:
        """Refreshes the gauges and publishes a snapshot (vLLM's make_stats); readers take ``snapshot``."""
        s = self.stats
        s.num_waiting = len(self.scheduler.waiting)
        s.num_running = len(self.scheduler.running)
        s.kv_blocks_used = self.kv.num_used_blocks
        s.preemptions = self.scheduler.num_preemptions
        s.adapter_admissions_overdue = self.scheduler.num_admissions_overdue
        s.prefix_cache_queries, s.prefix_cache_hits = self.kv.prefix_queries, self.kv.prefix_hits
        s.running_adapter_names = _adapter_names(self.scheduler.running)
        s.waiting_adapter_names = _adapter_names(self.scheduler.waiting)
        idle = not self.scheduler.has_unfinished()  # the last step before idling: nothing refreshes later
        fresh = idle or time.monotonic() - self._adapter_counts_at >= ADAPTER_COUNTS_SECONDS
        if fresh:
            self.refresh_adapter_counts()
        self.snapshot = s.snapshot(None if fresh else self.snapshot)  # per-adapter counters as fresh as the gauges

    def publish_stats(self) -> None:
        """A fresh snapshot with the adapter gauges re-read (after adapter operations; step thread)."""
        self._adapter_counts_at = -ADAPTER_COUNTS_SECONDS
        self._update_stats()

    def refresh_adapter_counts(self) -> None:
        """Adapter gauges from the registry: a walk under its lock, so at most every
        ADAPTER_COUNTS_SECONDS from the step loop, and right after adapter operations."""
        self._adapter_counts_at = time.monotonic()
        if self.adapters is None:
            return
        s = self.stats
        c = self.adapters.counts()
        s.lora_slots_total, s.lora_slots_used = c.lora_slots_total, c.lora_slots_used
        s.adapters_resident, s.adapters_cached = c.adapters_resident, c.adapters_cached
        s.adapters_registered, s.adapter_slot_evictions = c.adapters_registered, c.slot_evictions
        s.adapter_source_loads, s.adapter_source_load_seconds = c.source_loads, c.source_load_seconds
        s.adapter_slot_lookups, s.adapter_slot_hits = c.slot_lookups, c.slot_hits
        s.adapter_cpu_lookups, s.adapter_cpu_hits = c.cpu_lookups, c.cpu_hits
        s.adapter_loads_in_flight = c.loads_in_flight
        s.adapter_load_times = tuple((stage, *hist) for stage, hist in sorted(c.load_times.items()))
        self._update_residency(c)

    def _update_residency(self, c: Any) -> None:
        """Re-lists the adapters only when the registry's counts moved (listing thousands each step costs)."""
        key = (c.slot_loads, c.slot_evictions, c.source_loads, c.cpu_evictions, c.adapters_registered,
               c.lora_slots_used, c.adapters_resident, c.adapters_cached)
        if key != self._residency_key and self.adapters is not None:
            self._residency_key = key
            levels = {"resident": "gpu", "cached": "cpu", "registered": "disk"}
            infos = self.adapters.list()
            self.stats.adapter_residency = tuple(AdapterResidency(a.name, levels[str(a.state)], a.pinned, a.rank)
                                                 for a in infos)
            self.stats.resident_adapters = tuple(a.name for a in infos if a.state is AdapterState.RESIDENT)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix block no request holds (call on the step thread); False when
        blocks in use kept some of the cache."""
        done = self.kv.reset_prefix_cache()
        self._update_stats()
        return done

    # ---- chat
    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> str:
        return self.input_processor.render_chat(ChatInput(messages, tools, template_kwargs, add_generation_prompt))


GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """The step loop allocates a few small objects per token (outputs, deltas) that reference
    counting frees; the cyclic collector, run every 700 allocations by default, then walks
    every live object (model, tokenizer, sequences) over and over: at 256 sequences it was half
    of the host time of a decode step. Once loaded, the long-lived objects are frozen out of
    its reach and it runs less often (vLLM's engine core freezes too). The serving process
    calls it too once it serves: there a full collection walking the imported modules stalled
    every stream for 0.3-0.5 s (CPU, 32 streams)."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _adapter_names(seqs: Any) -> tuple[str, ...]:
    return tuple(sorted({s.adapter_key[0] for s in seqs if s.adapter_key is not None}))
