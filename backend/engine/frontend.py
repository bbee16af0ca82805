"""The half of the engine client that lives with the event loop, whichever process runs the core.

It reserves a request's place before any await (so the queue bound holds under
a flood), runs the input step on a thread, and routes the core's output
batches to per-request ``OutputStream``s (which merge the deltas a consumer has
not taken yet, so a consumer that falls behind gets them as one). Subclasses say how requests and operations
reach the core: ``AsyncEngine`` (a thread here) or ``CoreProcessClient``.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import itertools
from collections.abc import AsyncGenerator
from typing import Any

from loraplex.backend.engine.engine_core import Emitted, RequestFailure
from loraplex.backend.engine.input_processor import InputProcessor
from loraplex.backend.engine.output_stream import OutputStream
from loraplex.backend.engine.protocol import ABORTED_BY_REQUEST, LoadReport, ModelProperties, load_report
from loraplex.backend.engine.request import EngineRequest, ProcessedRequest
from loraplex.backend.engine.stats import EngineStats
from loraplex.backend.outputs import RequestOutput
from loraplex.config import EngineConfig
from loraplex.errors import EngineDeadError, EngineDrainingError, InvalidRequestError, QueueFullError
from loraplex.lora.types import AdapterInfo


class FrontEnd(abc.ABC):
    def __init__(self, config: EngineConfig):
        self.config = config
        self._streams: dict[str, OutputStream] = {}
        self._serial_of: dict[str, int] = {}  # submitted to the core, by request id
        self._aborted: set[str] = set()  # aborted while in the input step
        self._serials = itertools.count(1)
        self._loading: set[str] = set()
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._props: ModelProperties | None = None
        self._inputs: InputProcessor | None = None

    # ---- what the core side provides
    @abc.abstractmethod
    def _send_add(self, proc: ProcessedRequest, serial: int) -> None:
        """Provided by the core side (in-process thread or core process)."""

    @abc.abstractmethod
    def _send_abort(self, request_id: str, serial: int, error: str | None) -> None:
        """Provided by the core side (in-process thread or core process)."""

    @abc.abstractmethod
    def _snapshot(self) -> EngineStats:
        """Provided by the core side (in-process thread or core process)."""

    @abc.abstractmethod
    def _core_alive(self) -> bool:
        """Provided by the core side (in-process thread or core process)."""

    @abc.abstractmethod
    def dead_reason(self) -> str:
        """Provided by the core side (in-process thread or core process)."""

    # ---- properties
    @property
    def properties(self) -> ModelProperties:
        if self._props is None:
            raise EngineDeadError("engine not started")
        return self._props

    @property
    def model_name(self) -> str:
        return self.properties.model_name

    @property
    def max_model_len(self) -> int:
        return self.properties.max_model_len

    @property
    def input_processor(self) -> InputProcessor:
        if self._inputs is None:
            raise EngineDeadError("engine not started")
        return self._inputs

    # ---- health
    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> None:
        self._draining = True

    def num_unfinished(self) -> int:
        return len(self._streams)

    def is_healthy(self) -> bool:
        return self._props is not None and self._core_alive()

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._snapshot(), loop_alive=self.is_healthy())

    def get_load(self) -> LoadReport:
        return load_report(self._snapshot(), tuple(sorted(self._loading)), self.config.lora.max_loras)

    # ---- requests
    async def generate(self, req: EngineRequest) -> AsyncGenerator[RequestOutput, None]:
        rid = req.request_id
        stream = self._reserve(rid)  # no await before this: the bound holds however many arrive at once
        serial = 0
        finished = False
        try:
            proc = await asyncio.to_thread(self.input_processor.process, req)
            if rid in self._aborted:
                finished = True
                yield aborted_output(rid)
                return
            self._check_alive()
            serial = next(self._serials)
            self._serial_of[rid] = serial
            self._send_add(proc, serial)
            while not finished:
                out = await stream.get()  # every delta since the last call, as one; raises a failure
                finished = out.finished
                yield out
        finally:
            self._streams.pop(rid, None)
            self._serial_of.pop(rid, None)
            self._aborted.discard(rid)
            if serial and not finished and not stream.failed:
                self._send_abort(rid, serial, None)

    def _reserve(self, rid: str) -> OutputStream:
        if self._draining:
            raise EngineDrainingError()
        self._check_alive()
        if not rid:
            raise InvalidRequestError("request_id", "must not be empty")
        capacity = self.config.scheduler.max_waiting_requests + self.config.scheduler.max_num_seqs
        if len(self._streams) >= capacity:
            raise QueueFullError(f"server is at capacity ({len(self._streams)} requests queued or running); "
                                 "retry later")
        if rid in self._streams:
            raise InvalidRequestError("request_id", f"{rid!r} is already running")
        stream = self._streams[rid] = OutputStream()
        return stream

    def _check_alive(self) -> None:
        if not self.is_healthy():
            raise EngineDeadError(f"engine loop is not running: {self.dead_reason()}")

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._streams:
            return False
        serial = self._serial_of.get(request_id)
        if serial is None:
            self._aborted.add(request_id)  # still in the input step: it ends there
        else:
            self._send_abort(request_id, serial, ABORTED_BY_REQUEST)
        return True

    def _dispatch(self, items: list[Emitted]) -> None:
        streams = self._streams
        for item in items:
            stream = streams.get(item.request_id)
            if stream is not None:
                stream.put(item)

    def _fail_all(self, message: str) -> None:
        """Ends every open stream with an error (the core is gone)."""
        for rid, stream in list(self._streams.items()):
            stream.put(RequestFailure(rid, EngineDeadError(message)))

    # ---- tokenizer (front end only; off the event loop)
    async def tokenize(self, prompt: str | None, messages: list[dict[str, Any]] | None = None,
                       tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                       add_special_tokens: bool = True) -> list[int]:
        return await asyncio.to_thread(self.input_processor.tokenize, prompt, messages, tools, template_kwargs,
                                       add_special_tokens)

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return await asyncio.to_thread(self.input_processor.detokenize, token_ids, skip_special_tokens)

    # ---- adapters: subclasses run the registry call; the front end tracks names being loaded
    async def load_adapter(self, name: str, source: str, revision: str | None = None, replace: bool = False,
                           pinned: bool = False) -> AdapterInfo:
        self._loading.add(name)
        try:
            info: AdapterInfo = await self._adapter_op("register", name, str(source), revision=revision or None,
                                                       replace=replace, pinned=pinned)
            return info
        finally:
            self._loading.discard(name)

    async def unload_adapter(self, name: str) -> None:
        await self._adapter_op("unregister", name)

    async def list_adapters(self) -> list[AdapterInfo]:
        adapters: list[AdapterInfo] = await self._adapter_op("list")
        return adapters

    @abc.abstractmethod
    async def _adapter_op(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """Provided by the core side (in-process thread or core process)."""


def aborted_output(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, [], "", finished=True, finish_reason="abort", error=ABORTED_BY_REQUEST)
