"""The engine-client protocol: what the gRPC servicer (and any other front end) calls.

Two implementations: ``AsyncEngine`` (the engine core on a thread of this
process) and ``CoreProcessClient`` (the engine core in a process of its own,
``core_process``). Both take ``EngineRequest``s, run the input step
(``InputProcessor``) off the event loop, and stream ``RequestOutput`` deltas.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from loraplex.backend.engine.input_processor import InputProcessor
from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.engine.stats import EngineStats
from loraplex.backend.outputs import RequestOutput
from loraplex.config import EngineConfig
from loraplex.errors import LoraplexError
from loraplex.lora.types import AdapterInfo

ABORTED_BY_REQUEST = "aborted by an Abort call"


@dataclass(frozen=True)
class ModelProperties:
    """What the front end knows of the model once the core has loaded it (the server info)."""

    model_name: str
    max_model_len: int
    vocab_size: int
    device: str
    dtype: str
    eos_token_id: int  # 0 when the tokenizer has none
    chat_template: str  # "" = none


@dataclass(frozen=True)
class LoadReport:
    """What an external router needs to place requests (``GetLoad``)."""

    running: int
    waiting: int
    kv_usage: float  # fraction of KV blocks held by requests
    kv_blocks_used: int
    kv_blocks_total: int
    resident_adapters: tuple[str, ...]
    loading_adapters: tuple[str, ...]
    max_loras: int


def load_report(stats: EngineStats, loading: tuple[str, ...], max_loras: int) -> LoadReport:
    return LoadReport(stats.num_running, stats.num_waiting, stats.kv_usage, stats.kv_blocks_used,
                      stats.kv_blocks_total, stats.resident_adapters, loading, max_loras)


class RemoteEngineError(LoraplexError):
    """A user-facing error raised in the engine-core process, carried over with its status."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteEngineError, (self.status, self.message))


@runtime_checkable
class EngineClient(Protocol):
    config: EngineConfig

    @property
    def properties(self) -> ModelProperties: ...

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def input_processor(self) -> InputProcessor:
        """The front end's input step and tokenizer (always in the caller's process)."""
        ...

    # ---- lifecycle and health
    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def start_draining(self) -> None: ...

    @property
    def draining(self) -> bool: ...

    def is_healthy(self) -> bool: ...

    def num_unfinished(self) -> int: ...

    # ---- requests
    def generate(self, req: EngineRequest) -> AsyncGenerator[RequestOutput, None]:
        """Deltas of ``req``; the last has ``finished``. Closing the iterator early aborts the request."""
        ...

    async def abort(self, request_id: str) -> bool:
        """Ends a running request (its stream gets a final ``abort`` message, its KV is freed);
        False when no such request is in flight."""
        ...

    # ---- adapters
    async def load_adapter(self, name: str, source: str, revision: str | None = None, replace: bool = False,
                           pinned: bool = False) -> AdapterInfo: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def list_adapters(self) -> list[AdapterInfo]: ...

    # ---- tokenizer
    async def tokenize(self, prompt: str | None, messages: list[dict[str, Any]] | None = None,
                       tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                       add_special_tokens: bool = True) -> list[int]: ...

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    # ---- state
    def get_load(self) -> LoadReport: ...

    async def reset_prefix_cache(self) -> bool: ...

    def stats(self) -> EngineStats: ...
