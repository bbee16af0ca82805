"""The asyncio face of the engine: what the gRPC servicer (and nothing else) calls.

The engine's step loop runs on its own thread; new requests and aborts reach it
through an inbox drained at the top of each step, and each step's outputs come
back to the event loop in one batch. Requests are validated (and tokenized, and
their adapter version pinned) in the caller before anything is queued, so bad
input fails before any work starts.

    engine = AsyncEngine(config); await engine.start()
    async for out in engine.generate(EngineRequest(...)):   # RequestOutput deltas; last has finished=True
        ...
    # closing the iterator early (client cancel, deadline, disconnect) aborts the request in the engine
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from loraplex.backend.engine.llm_engine import LLMEngine
from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.engine.sequence import Sequence
from loraplex.backend.engine.stats import EngineStats
from loraplex.backend.outputs import RequestOutput
from loraplex.config import EngineConfig
from loraplex.errors import (
    ConfigError,
    EngineDeadError,
    EngineDrainingError,
    InvalidRequestError,
    QueueFullError,
)
from loraplex.lora.types import AdapterInfo

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3  # failed steps in a row that mark the engine dead
ABORTED_BY_CALL = "aborted by an Abort call"


@dataclass
class LoadReport:
    """The engine's load, as GetLoad reports it (TEMP: h/core owns the real one)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    resident_adapters: list[str] = field(default_factory=list)
    loading_adapters: list[str] = field(default_factory=list)
    max_loras: int = 0


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        self.config = config
        self.engine = engine or LLMEngine(config)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._draining = False
        self._dead: str | None = None
        self._fault: tuple[BaseException, bool] | None = None
        self._failures = 0

    # ---- properties the servicer reads
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def device(self) -> str:
        return str(self.engine.device)

    @property
    def dtype(self) -> str:
        return str(self.engine.parts.dtype).removeprefix("torch.")

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> str:
        return self.engine.apply_chat_template(messages, tools, template_kwargs, add_generation_prompt)

    # ---- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    def start_draining(self) -> None:
        self._draining = True

    def num_unfinished(self) -> int:
        return len(self._queues)

    def is_healthy(self) -> bool:
        if self._dead is not None or self._thread is None or not self._thread.is_alive():
            return False
        started = self.engine.stats.last_step_started
        return not (started and time.monotonic() - started > self.config.stuck_step_seconds)

    def stats(self) -> EngineStats:
        for _ in range(5):  # the step thread may be updating the per-adapter dicts right now
            try:
                s = copy.deepcopy(self.engine.stats)
                break
            except RuntimeError:
                time.sleep(0.001)
        else:
            s = copy.copy(self.engine.stats)
        s.loop_alive = self.is_healthy()
        return s

    # ---- requests
    async def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        self._check_accepting()
        if len(self._queues) >= self.config.scheduler.max_waiting_requests + self.config.scheduler.max_num_seqs:
            raise QueueFullError(f"server is at capacity ({len(self._queues)} requests queued or running); "
                                 "retry later")
        if req.request_id and req.request_id in self._queues:
            raise InvalidRequestError("request_id", f"{req.request_id!r} is already running")
        seq = await asyncio.to_thread(self.engine.make_sequence, req)
        rid = seq.request_id
        out_queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[rid] = out_queue
        self._submit("add", seq)
        finished = False
        try:
            while not finished:
                out = await out_queue.get()
                finished = out.finished
                yield out
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self._submit("abort", rid)

    async def abort(self, request_id: str) -> bool:
        """Aborts a running or waiting request; its stream ends with finish_reason "abort"."""
        if request_id not in self._queues:
            return False
        self._submit("abort", (request_id, ABORTED_BY_CALL))
        return True

    # ---- tokens, load, prefix cache (TEMP engine methods for the new RPCs; h/core owns them)
    async def tokenize(self, prompt: str | None, messages: list[dict[str, Any]] | None = None,
                       tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                       add_special_tokens: bool = True) -> list[int]:
        if messages is not None:
            prompt = self.apply_chat_template(messages, tools, template_kwargs)
        if not prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        text = prompt
        return await asyncio.to_thread(lambda: list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens)))

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        vocab = self.engine.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError("token_ids", f"token id {bad[0]} outside the vocabulary [0, {vocab})")
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def get_load(self) -> LoadReport:
        s = self.engine.stats
        registry = self.engine.adapters
        return LoadReport(running=s.num_running, waiting=s.num_waiting, kv_usage=s.kv_usage,
                          kv_blocks_used=s.kv_blocks_used, kv_blocks_total=s.kv_blocks_total,
                          resident_adapters=registry.resident_names() if registry is not None else [],
                          loading_adapters=registry.loading_names() if registry is not None else [],
                          max_loras=self.config.lora.max_loras)

    async def reset_prefix_cache(self) -> bool:
        done: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self._submit("reset_prefix_cache", done)
        return await asyncio.wrap_future(done)

    def _check_accepting(self) -> None:
        if self._draining:
            raise EngineDrainingError()
        if not self.is_healthy():
            raise EngineDeadError(f"engine loop is not running: {self._dead or 'not started'}")

    def _submit(self, kind: str, item: Any) -> None:
        self._inbox.put((kind, item))
        self._wake.set()

    # ---- adapters
    async def load_adapter(self, name: str, source: str, revision: str | None = None, replace: bool = False,
                           pinned: bool = False) -> AdapterInfo:
        registry = self._registry()
        return await asyncio.to_thread(registry.register, name, source, revision=revision or None,
                                       replace=replace, pinned=pinned)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._registry().unregister, name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self._registry().list() if self.engine.adapters is not None else []

    def _registry(self) -> Any:
        if self.engine.adapters is None:
            raise ConfigError("LoRA is disabled on this server (enable_lora=False)")
        return self.engine.adapters

    # ---- the step loop (engine thread)
    def _run(self) -> None:
        self.engine.stats.loop_alive = True
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:  # the loop itself died: fail every request, health goes down
            log.exception("engine loop died")
            self._dead = repr(exc)
            self._fail_all(f"engine loop died: {exc!r}")
        finally:
            self.engine.stats.loop_alive = False

    def _step(self) -> None:
        fault, self._fault = self._fault, None
        if fault is not None and fault[1]:
            raise fault[0]  # fatal: the loop dies
        try:
            if fault is not None:
                raise fault[0]
            outputs = self.engine.step()
        except Exception as exc:  # a failed step aborts the requests in flight; the loop goes on
            log.exception("engine step failed; aborting the requests in flight")
            self._failures += 1
            self._fail_all(f"engine step failed: {exc!r}")
            if self._failures >= MAX_CONSECUTIVE_FAILURES:
                raise
            return
        self._failures = 0
        self._deliver(outputs)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                seq: Sequence = item
                if seq.request_id in self._queues:
                    self.engine.add_sequence(seq)
                else:
                    self.engine.release_sequence(seq)  # cancelled before it reached the engine
            elif kind == "reset_prefix_cache":
                item.set_result(self.engine.kv.reset_prefix_cache())
            else:
                rid, error = item if isinstance(item, tuple) else (item, None)
                out = self.engine.abort(rid, error=error)
                if out is not None:
                    self._deliver([out])

    def _fail_all(self, message: str) -> None:
        outputs = [o for rid in list(self.engine.seqs) if (o := self.engine.abort(rid, error=message))]
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    # ---- test hook
    def _inject_step_fault(self, exc: BaseException, fatal: bool = True) -> None:
        """Makes the next step raise ``exc``: fatal kills the loop (health goes NOT_SERVING);
        non-fatal aborts the requests in flight and the loop goes on."""
        self._fault = (exc, fatal)
        self._wake.set()
