"""The synchronous engine core: add a request, abort it, step.

``step()`` = ``schedule()`` -> ``execute()`` -> ``update_after_step()`` plus output
processing; it returns one ``RequestOutput`` delta per request that produced
something. Not thread-safe: the async engine calls it from one thread.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import torch

from loraplex.backend.engine.kv_cache import KVCacheManager
from loraplex.backend.engine.output import OutputState, append_token, flush_text, make_output
from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.engine.runner import ModelRunner, StepResult
from loraplex.backend.engine.scheduler import Scheduler, SchedulerOutput
from loraplex.backend.engine.sequence import Sequence, Status
from loraplex.backend.engine.setup import EngineParts, build_engine_parts
from loraplex.backend.engine.stats import EngineStats
from loraplex.backend.engine.structured import StructuredOutputs, after_token
from loraplex.backend.outputs import RequestOutput
from loraplex.config import EngineConfig
from loraplex.errors import InvalidRequestError

log = logging.getLogger(__name__)


class LLMEngine:
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
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, config.lora.max_loras)
        self.runner = ModelRunner(parts.model, parts.num_blocks, config.cache.block_size, parts.dtype,
                                  parts.device, config.model.seed, cuda_graphs=not config.model.enforce_eager,
                                  max_model_len=self.max_model_len, max_num_seqs=config.scheduler.max_num_seqs)
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats(kv_blocks_total=parts.num_blocks)
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_ids)

    @property
    def device(self) -> torch.device:
        return self.parts.device

    # ---- requests
    def make_sequence(self, req: EngineRequest) -> Sequence:
        """Validates and tokenizes a request (thread-safe; touches no scheduler state)."""
        prompt_ids = self._prompt_ids(req)
        params = req.params
        params.check_vocab(self.vocab_size)
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise InvalidRequestError("prompt", f"{n} tokens; must be shorter than max_model_len={self.max_model_len}")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n
        if n + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds max_model_len="
                f"{self.max_model_len}")
        grammar = self.structured.request_grammar(params)  # compiled (or cached) before any work is queued
        seq = Sequence(request_id=req.request_id or uuid.uuid4().hex, prompt_token_ids=prompt_ids, params=params,
                       max_tokens=max_tokens, priority=req.priority, structured=grammar)
        seq.timings.arrival = req.arrival_time
        if req.adapter:
            if self.adapters is None:
                raise InvalidRequestError("adapter", "LoRA is disabled on this server")
            seq.adapter = self.adapters.acquire(req.adapter)
            seq.adapter_key = seq.adapter.key
        seq.state = OutputState.create(seq, self.tokenizer)
        return seq

    def _prompt_ids(self, req: EngineRequest) -> list[int]:
        if (req.prompt is None) == (req.prompt_token_ids is None):
            raise InvalidRequestError("prompt", "give exactly one of prompt text or prompt token ids")
        if req.prompt is not None:
            if not req.prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            return list(self.tokenizer.encode(req.prompt, add_special_tokens=True))
        ids = list(req.prompt_token_ids or [])
        if not ids:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad[0]} outside the vocabulary "
                                      f"[0, {self.vocab_size})")
        return ids

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
        seq = self.make_sequence(req)
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
        return self.scheduler.has_unfinished()

    # ---- one step
    def step(self) -> list[RequestOutput]:
        self.stats.last_step_started = time.monotonic()
        sched = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        if not sched.is_empty:
            slot_of = self._assign_slots(sched)
            result = self.runner.execute(sched, slot_of)
            outputs = self._process(sched, result)
        self.stats.num_steps += 1
        self._update_stats()
        self.stats.last_step_started = 0.0
        return outputs

    def _assign_slots(self, sched: SchedulerOutput) -> dict[tuple[str, int], int]:
        versions = {s.seq.adapter for s in sched.scheduled if s.seq.adapter is not None}
        if not versions:
            return {}
        assert self.adapters is not None
        return {v.key: slot for v, slot in self.adapters.ensure_resident(versions).items()}

    def _process(self, sched: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        samplers = [item.seq for item in sched.scheduled if item.samples]
        for rid, lps in result.prompt_logprobs.items():
            state: OutputState = self.seqs[rid].state
            if state.prompt_logprobs is not None:
                state.prompt_logprobs.extend(lps)
        self.scheduler.update_after_step(sched)
        outputs = []
        for seq in samplers:
            token = result.sampled[seq.request_id]
            out = append_token(seq, token, result.logprobs.get(seq.request_id), self.eos_ids, self.max_model_len)
            after_token(seq, out)  # advances its grammar matcher; a completed grammar ends the request
            name = seq.adapter_key[0] if seq.adapter_key else ""
            self.stats.tokens_by_adapter[name] = self.stats.tokens_by_adapter.get(name, 0) + 1
            self.stats.generation_tokens += 1
            outputs.append(out)
            if out.finished:
                self._finish(seq)
        return outputs

    def _finish(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq)
        self.runner.release(seq.request_id)
        self.seqs.pop(seq.request_id, None)
        self.release_sequence(seq)

    def release_sequence(self, seq: Sequence) -> None:
        """Unpins the adapter version a sequence holds (for sequences that never ran or are done)."""
        if seq.adapter is not None and self.adapters is not None:
            self.adapters.release(seq.adapter)
            seq.adapter = None

    def _update_stats(self) -> None:
        s = self.stats
        s.num_waiting = len(self.scheduler.waiting)
        s.num_running = len(self.scheduler.running)
        s.kv_blocks_used = self.kv.num_used_blocks
        s.preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries, s.prefix_cache_hits = self.kv.prefix_queries, self.kv.prefix_hits
        if self.adapters is not None:
            c = self.adapters.counts()
            s.lora_slots_total, s.lora_slots_used = c.lora_slots_total, c.lora_slots_used
            s.adapters_resident, s.adapters_cached = c.adapters_resident, c.adapters_cached
            s.adapters_registered, s.adapter_evictions = c.adapters_registered, c.adapter_evictions
            s.adapter_loads, s.adapter_load_seconds = c.source_loads, c.source_load_seconds

    # ---- chat
    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("messages", f"model {self.model_name!r} has no chat template")
        try:
            return str(self.tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt,
                **(template_kwargs or {})))
        except Exception as exc:  # jinja errors on malformed messages
            raise InvalidRequestError("messages", f"chat template failed: {exc}") from exc
