"""The engine client with the engine core on a thread of this process.

    engine = AsyncEngine(config); await engine.start()
    async for out in engine.generate(EngineRequest(...)):   # RequestOutput deltas; last has finished=True
        ...
    # closing the iterator early (client cancel, deadline, disconnect) aborts the request in the engine

``loraplex serve`` runs the core in a process of its own (``core_process``);
this in-process client serves tests, the harness and ``--engine-in-process``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loraplex.backend.engine.engine_core import Emitted, EngineCore
from loraplex.backend.engine.frontend import FrontEnd
from loraplex.backend.engine.llm_engine import LLMEngine
from loraplex.backend.engine.protocol import ModelProperties
from loraplex.backend.engine.request import ProcessedRequest
from loraplex.backend.engine.stats import EngineStats
from loraplex.config import EngineConfig
from loraplex.errors import ConfigError

OP_TIMEOUT = 60.0  # seconds an operation on the step thread may wait for the current step


class AsyncEngine(FrontEnd):
    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        super().__init__(config)
        self.engine = engine or LLMEngine.create(config)
        self.core = EngineCore(self.engine, self._emit)
        self._props = model_properties(self.engine)
        self._inputs = self.engine.input_processor

    # ---- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.core.start()

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.core.stop)

    def _core_alive(self) -> bool:
        if not self.core.is_alive():
            return False
        started = self.engine.stats.last_step_started  # one float read from the live stats: no copy
        return not (started and time.monotonic() - started > self.config.stuck_step_seconds)

    def dead_reason(self) -> str:
        return self.core.dead or "not started"

    def _snapshot(self) -> EngineStats:
        return self.engine.snapshot

    # ---- to the core
    def _send_add(self, proc: ProcessedRequest, serial: int) -> None:
        self.core.add(proc, serial)

    def _send_abort(self, request_id: str, serial: int, error: str | None) -> None:
        self.core.abort(request_id, serial, error)

    def _emit(self, items: list[Emitted]) -> None:  # the core's threads
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._dispatch, items)

    async def reset_prefix_cache(self) -> bool:
        self._check_alive()
        done: bool = await asyncio.wait_for(asyncio.wrap_future(self.core.call(LLMEngine.reset_prefix_cache)),
                                            OP_TIMEOUT)
        return done

    async def _adapter_op(self, op: str, *args: Any, **kwargs: Any) -> Any:
        registry = self.engine.adapters
        if registry is None:
            raise ConfigError("LoRA is disabled on this server (enable_lora=False)")
        if op == "list":
            return registry.list()
        result = await asyncio.to_thread(getattr(registry, op), *args, **kwargs)
        if self.core.is_alive():  # gauges follow the operation before it returns, not at the next step
            await asyncio.wait_for(asyncio.wrap_future(self.core.call(LLMEngine.publish_stats)), OP_TIMEOUT)
        return result

    def _inject_step_fault(self, exc: BaseException, fatal: bool = True) -> None:
        """Test hook (see ``EngineCore.inject_step_fault``)."""
        self.core.inject_step_fault(exc, fatal)


def model_properties(engine: LLMEngine) -> ModelProperties:
    eos = engine.tokenizer.eos_token_id
    return ModelProperties(engine.model_name, engine.max_model_len, engine.vocab_size, str(engine.device),
                           str(engine.parts.dtype).removeprefix("torch."), eos if isinstance(eos, int) else 0,
                           str(getattr(engine.tokenizer, "chat_template", None) or ""))


