"""The engine core's loop: one ``LLMEngine`` stepped on its own thread.

The same loop runs inside the serving process (``AsyncEngine``) and inside the
engine-core process (``core_process``). New requests are prepared (adapter
version pinned, which may read files) on a small pool, then reach the step
thread through an inbox drained at the top of each step, as do aborts. Each
step's outputs leave through ``emit`` as one batch.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeAlias

from loraplex.backend.engine.llm_engine import LLMEngine
from loraplex.backend.engine.request import ProcessedRequest
from loraplex.backend.engine.sequence import Sequence
from loraplex.backend.outputs import RequestOutput

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3  # failed steps in a row that kill the loop
PREPARE_THREADS = 4
MAX_TOMBSTONES = 4096  # aborts that arrived before their request (bounded; stale ones never match)


@dataclass
class RequestFailure:
    """A request refused by the core before it ran (unknown adapter, unreadable adapter files...)."""

    request_id: str
    error: BaseException


Emitted: TypeAlias = RequestOutput | RequestFailure
Emit: TypeAlias = Callable[[list[Emitted]], None]


class FatalStepFault(BaseException):
    """Raised by an injected fatal fault: escapes the step's error handling and kills the loop."""


class EngineCore:
    def __init__(self, engine: LLMEngine, emit: Emit):
        self.engine = engine
        self._emit = emit
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._prepare = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="loraplex-prepare")
        self._tombstones: collections.OrderedDict[tuple[str, int], str | None] = collections.OrderedDict()
        self._serial_of: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._failures = 0
        self.dead: str | None = None

    # ---- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._prepare.shutdown(wait=False, cancel_futures=True)

    def is_alive(self) -> bool:
        return self.dead is None and self._thread is not None and self._thread.is_alive()

    # ---- intake (any thread)
    def add(self, proc: ProcessedRequest, serial: int) -> None:
        self._prepare.submit(self._prepare_one, proc, serial)

    def abort(self, request_id: str, serial: int, error: str | None = None) -> None:
        self._submit(("abort", request_id, serial, error))

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future[Any]:
        """Runs ``fn(engine)`` on the step thread between steps (for scheduler or KV state)."""
        done: Future[Any] = Future()
        self._submit(("call", fn, done))
        return done

    def inject_step_fault(self, exc: BaseException, fatal: bool = True) -> None:
        """Test hook: the next step raises ``exc``; fatal kills the loop (health goes NOT_SERVING),
        non-fatal aborts the requests in flight and the loop goes on."""
        engine, step = self.engine, self.engine.step

        def failing_step() -> list[RequestOutput]:
            engine.step = step  # type: ignore[method-assign]  # one shot
            raise FatalStepFault(exc) if fatal else exc

        engine.step = failing_step  # type: ignore[method-assign]
        self._wake.set()

    def _prepare_one(self, proc: ProcessedRequest, serial: int) -> None:
        try:
            seq = self.engine.make_sequence(proc)
        except Exception as exc:
            self._emit([RequestFailure(proc.request_id, exc)])
            return
        self._submit(("add", seq, serial))

    def _submit(self, item: tuple[Any, ...]) -> None:
        self._inbox.put(item)
        self._wake.set()

    # ---- the step thread
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
        except BaseException as exc:  # the loop itself died: fail every request
            log.exception("engine loop died")
            self.dead = repr(exc.args[0] if isinstance(exc, FatalStepFault) else exc)
            self._fail_all(f"engine loop died: {self.dead}")
        finally:
            self.engine.stats.loop_alive = False
            self.engine.snapshot = self.engine.stats.snapshot()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step aborts the requests in flight; the loop goes on
            log.exception("engine step failed; aborting the requests in flight")
            self._failures += 1
            self._fail_all(f"engine step failed: {exc!r}")
            if self._failures >= MAX_CONSECUTIVE_FAILURES:
                raise
            return
        self._failures = 0
        for out in outputs:
            if out.finished:
                self._serial_of.pop(out.request_id, None)
        emitted: list[Emitted] = list(outputs)
        for rid, error in self.engine.take_failures():  # their adapter failed to load
            self._serial_of.pop(rid, None)
            emitted.append(RequestFailure(rid, error))
        if emitted:
            self._emit(emitted)

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                self._add(item[1], item[2])
            elif item[0] == "abort":
                self._abort(item[1], item[2], item[3])
            else:
                self._call(item[1], item[2])

    def _add(self, seq: Sequence, serial: int) -> None:
        rid = seq.request_id
        try:
            self.engine.add_sequence(seq)
        except Exception as exc:
            self._emit([RequestFailure(rid, exc)])
            return
        self._serial_of[rid] = serial
        key = (rid, serial)
        if key in self._tombstones:  # aborted while it was being prepared
            self._abort(rid, serial, self._tombstones.pop(key))

    def _abort(self, request_id: str, serial: int, error: str | None) -> None:
        if self._serial_of.get(request_id) != serial:
            self._tombstones[(request_id, serial)] = error
            while len(self._tombstones) > MAX_TOMBSTONES:
                self._tombstones.popitem(last=False)
            return
        self._serial_of.pop(request_id, None)
        out = self.engine.abort(request_id, error=error)
        if out is not None:
            self._emit([out])

    def _call(self, fn: Callable[[LLMEngine], Any], done: Future[Any]) -> None:
        try:
            done.set_result(fn(self.engine))
        except Exception as exc:
            done.set_exception(exc)

    def _fail_all(self, message: str) -> None:
        self._serial_of.clear()
        outputs: list[Emitted] = [o for rid in list(self.engine.seqs) if (o := self.engine.abort(rid, error=message))]
        if outputs:
            self._emit(outputs)
