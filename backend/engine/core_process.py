"""The engine core in a process of its own (``loraplex serve``'s default).

The serving process keeps the event loop, the input step (chat templates,
tokenization, validation) and the output routing (``FrontEnd``); the core
process runs ``LLMEngine`` and its step loop (``EngineCore``), so the gRPC
server and the engine no longer share one GIL. Two ZMQ PUSH/PULL sockets over
ipc:// in a private directory carry pickled plain dataclasses: requests,
aborts and operations in; one message per step (its outputs as rows of plain
values, ``wire``, and the stats snapshot), operation replies and heartbeats
out. When the core dies, health goes NOT_SERVING and every open stream ends
with an error, never a hang.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from loraplex.backend.engine import wire
from loraplex.backend.engine.core_reader import CoreReader
from loraplex.backend.engine.engine_core import Emitted, EngineCore, RequestFailure
from loraplex.backend.engine.frontend import FrontEnd
from loraplex.backend.engine.input_processor import InputProcessor
from loraplex.backend.engine.protocol import ModelProperties, RemoteEngineError
from loraplex.backend.engine.request import ProcessedRequest
from loraplex.backend.engine.stats import EngineStats
from loraplex.config import EngineConfig
from loraplex.errors import ConfigError, EngineDeadError, LoraplexError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 0.5  # the core says it is alive at least this often
START_TIMEOUT = 900.0  # loading a large model from disk may take minutes
STOP_TIMEOUT = 15.0


def portable(exc: BaseException) -> RemoteEngineError:
    """An error that survives pickling with its status and message."""
    if isinstance(exc, LoraplexError):
        return RemoteEngineError(exc.status, exc.message)
    return RemoteEngineError("INTERNAL", f"engine core: {exc!r}")


# ---- the core process --------------------------------------------------------------------------


class _Sender:
    """Everything the core sends, in the order it is handed over, pickled and sent by one thread of
    its own: a step's outputs are encoded while the step thread goes on with the next step (which
    waits on the device with the GIL released), as vLLM's engine core does. Steps, operations and
    heartbeats hand messages over from any thread; the PUSH socket has one user."""

    def __init__(self, socket: zmq.Socket[bytes]):
        self._socket = socket
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="loraplex-core-out", daemon=True)
        self._thread.start()

    def send(self, msg: tuple[Any, ...]) -> None:
        self._queue.put(msg)

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Sends what is queued, then stops."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (msg := self._queue.get()) is not None:
            try:
                data = pickle.dumps(_encoded(msg), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # a value that does not pickle: its operation fails, nothing else
                log.exception("engine core: cannot send %r", msg[0])
                if msg[0] != "reply":
                    continue
                data = pickle.dumps(("reply", msg[1], False, portable(exc)), protocol=pickle.HIGHEST_PROTOCOL)
            self._socket.send(data)


def _encoded(msg: tuple[Any, ...]) -> tuple[Any, ...]:
    """A step's outputs as rows of plain values (``wire``); other messages as they are."""
    if msg[0] == "out":
        return ("out", wire.encode_items(_portable_items(msg[1])), msg[2])
    return msg


def run_core(config: EngineConfig, inbox: str, outbox: str) -> None:
    """The core process's main: build the engine, then serve the front end until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end drains, then stops the core itself
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(inbox)
    push.connect(outbox)
    push.setsockopt(zmq.SNDHWM, 0)
    sender = _Sender(push)
    try:
        from loraplex.backend.engine.async_engine import model_properties
        from loraplex.backend.engine.llm_engine import LLMEngine

        engine = LLMEngine.create(config)
    except BaseException as exc:
        log.exception("engine core failed to start")
        sender.send(("failed", portable(exc)))
        sender.close()
        push.close(linger=2000)
        return
    core = EngineCore(engine, lambda items: sender.send(("out", items, engine.snapshot)))
    core.start()
    sender.send(("ready", model_properties(engine), engine.tokenizer))
    try:
        _serve(core, pull, sender, config.stuck_step_seconds)
    finally:
        core.stop()
        sender.close()
        pull.close(linger=0)
        push.close(linger=1000)


def _portable_items(items: list[Emitted]) -> list[Emitted]:
    return [RequestFailure(i.request_id, portable(i.error)) if isinstance(i, RequestFailure) else i for i in items]


def _serve(core: EngineCore, pull: zmq.Socket[bytes], sender: _Sender, stuck_seconds: float) -> None:
    parent = os.getppid()
    ops = ThreadPoolExecutor(2, thread_name_prefix="loraplex-core-op")
    last_beat = 0.0
    while True:
        if pull.poll(int(HEARTBEAT_SECONDS * 1000)):
            msg = pickle.loads(pull.recv())
            kind = msg[0]
            if kind == "add":
                core.add(msg[1], msg[2])
            elif kind == "abort":
                core.abort(msg[1], msg[2], msg[3])
            elif kind == "op":
                ops.submit(_run_op, core, sender, *msg[1:])
            elif kind == "stop":
                break
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT_SECONDS:
            if os.getppid() != parent:  # the front end is gone: nobody reads our outputs
                break
            last_beat = now
            started = core.engine.stats.last_step_started
            stuck = bool(started) and now - started > stuck_seconds
            sender.send(("beat", core.engine.snapshot, core.dead, stuck))
    ops.shutdown(wait=False, cancel_futures=True)


def _run_op(core: EngineCore, sender: _Sender, op_id: int, name: str, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> None:
    try:
        value = _op(core, name, args, kwargs)
    except BaseException as exc:
        sender.send(("reply", op_id, False, portable(exc)))
        return
    sender.send(("out", [], core.engine.snapshot))  # the front end's gauges are fresh before the reply
    sender.send(("reply", op_id, True, value))


def _op(core: EngineCore, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    engine = core.engine
    if name == "reset_prefix_cache":
        return core.call(type(engine).reset_prefix_cache).result(STOP_TIMEOUT)
    if name == "fault":
        core.inject_step_fault(*args)
        return None
    if engine.adapters is None:
        raise ConfigError("LoRA is disabled on this server (enable_lora=False)")
    value = getattr(engine.adapters, name)(*args, **kwargs)
    if name != "list" and core.is_alive():
        core.call(type(engine).publish_stats).result(STOP_TIMEOUT)  # gauges follow the operation
    return value


# ---- the serving process -----------------------------------------------------------------------


class CoreProcessClient(FrontEnd):
    """The engine client whose core runs in a spawned process."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self._ctx = zmq.Context()
        self._dir = tempfile.mkdtemp(prefix="loraplex-core-")  # 0700: only this user reaches the sockets
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._pull = self._ctx.socket(zmq.PULL)  # used by one thread at a time: start, then the reader
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._reader: CoreReader | None = None
        self._snap = EngineStats()
        self._last_heard = 0.0
        self._dead: str | None = None
        self._core_dead: str | None = None
        self._stuck = False
        self._ops: dict[int, asyncio.Future[Any]] = {}
        self._op_ids = itertools.count(1)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        inbox, outbox = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._push.bind(inbox)
        self._pull.bind(outbox)
        self._proc = multiprocessing.get_context("spawn").Process(
            target=run_core, args=(self.config, inbox, outbox), name="loraplex-engine-core", daemon=True)
        self._proc.start()
        await self._wait_ready()
        self._reader = CoreReader(self._pull, self._loop, self._handle_batch, self._check_process)
        self._reader.start()

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            data = await asyncio.to_thread(self._recv_within, 0.2)
            if data is not None:
                msg = pickle.loads(data)
                if msg[0] == "failed":
                    await self.shutdown()
                    raise msg[1]
                if msg[0] == "ready":
                    props: ModelProperties = msg[1]
                    self._props = props
                    self._inputs = InputProcessor(msg[2], props.model_name, props.max_model_len, props.vocab_size)
                    self._last_heard = time.monotonic()
                    return
            elif self._proc is not None and not self._proc.is_alive():
                await self.shutdown()
                raise EngineDeadError(f"engine core exited while starting (exit code {self._proc.exitcode})")
        await self.shutdown()
        raise EngineDeadError(f"engine core did not start within {START_TIMEOUT:.0f}s")

    async def shutdown(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._send(("stop",))
            await asyncio.to_thread(self._proc.join, STOP_TIMEOUT)
            if self._proc.is_alive():
                self._proc.kill()
                await asyncio.to_thread(self._proc.join, STOP_TIMEOUT)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.stop)
        self._on_death("engine core stopped", expected=True)
        self._push.close(linger=0)
        self._pull.close(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- health and state
    def _core_alive(self) -> bool:
        if self._dead is not None or self._core_dead is not None or self._stuck:
            return False
        if self._proc is None or not self._proc.is_alive():
            return False
        return time.monotonic() - self._last_heard < self.config.stuck_step_seconds

    def dead_reason(self) -> str:
        return self._dead or self._core_dead or ("engine step stuck" if self._stuck else "not started")

    def _snapshot(self) -> EngineStats:
        return self._snap

    # ---- to the core
    def _send(self, msg: tuple[Any, ...]) -> None:
        self._push.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL), copy=False)

    def _send_add(self, proc: ProcessedRequest, serial: int) -> None:
        self._send(("add", proc, serial))

    def _send_abort(self, request_id: str, serial: int, error: str | None) -> None:
        if self._dead is None:
            self._send(("abort", request_id, serial, error))

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self._check_alive()
        op_id = next(self._op_ids)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops[op_id] = done
        try:
            self._send(("op", op_id, name, args, kwargs))
            return await done
        finally:
            self._ops.pop(op_id, None)

    async def _adapter_op(self, op: str, *args: Any, **kwargs: Any) -> Any:
        return await self._call(op, *args, **kwargs)

    async def reset_prefix_cache(self) -> bool:
        done: bool = await self._call("reset_prefix_cache")
        return done

    def _inject_step_fault(self, exc: BaseException, fatal: bool = True) -> None:
        """Test hook (see ``EngineCore.inject_step_fault``)."""
        self._send(("op", 0, "fault", (exc, fatal), {}))

    # ---- from the core
    def _recv_within(self, seconds: float) -> bytes | None:
        return self._pull.recv() if self._pull.poll(int(seconds * 1000)) else None

    def _handle_batch(self, batch: list[tuple[Any, ...]]) -> None:  # the event loop, from the reader thread
        if self._dead is None:
            for msg in batch:
                self._handle(msg)
            self._check_process()

    def _check_process(self) -> None:
        assert self._proc is not None
        if self._dead is None and not self._proc.is_alive():
            self._on_death(f"engine core process exited (exit code {self._proc.exitcode})")

    def _handle(self, msg: tuple[Any, ...]) -> None:
        self._last_heard = time.monotonic()
        kind = msg[0]
        if kind == "out":  # decoded by the reader
            self._snap = msg[2]
            self._dispatch(msg[1])
        elif kind == "beat":
            self._snap, self._core_dead, self._stuck = msg[1], msg[2], msg[3]
            if self._core_dead is not None:
                self._fail_all(f"engine loop died: {self._core_dead}")
        elif kind == "reply":
            done = self._ops.get(msg[1])
            if done is not None and not done.done():
                if msg[2]:
                    done.set_result(msg[3])
                else:
                    done.set_exception(msg[3])

    def _on_death(self, reason: str, expected: bool = False) -> None:
        if self._dead is None:
            if not expected or self._streams:
                log.error("%s: failing %d requests in flight", reason, len(self._streams))
            self._dead = reason
        self._fail_all(self._dead)
        for done in self._ops.values():
            if not done.done():
                done.set_exception(EngineDeadError(self._dead))
