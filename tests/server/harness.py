"""Real servers for the server tests: a real AsyncEngine behind a real grpc.aio server on a free
loopback port, running on an event loop of its own thread, so tests drive it with the generated
stubs and the clients from the main thread (sync, or their own ``asyncio.run``)."""

from __future__ import annotations

import asyncio
import functools
import tempfile
import threading
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from opentelemetry.sdk.trace import TracerProvider

from loraplex.backend.engine.async_engine import AsyncEngine
from loraplex.backend.engine.core_process import CoreProcessClient
from loraplex.backend.server.config import ServerConfig
from loraplex.backend.server.server import GrpcServer
from loraplex.clients import pb
from loraplex.config import EngineConfig

T = TypeVar("T")
# on the CPU even where a GPU is present: these tests are about the server, and their timing
# assumptions (deadlines, drains) hold for the demo model on a CPU
SMALL_ENGINE = {"device": "cpu", "max_model_len": 256, "max_num_seqs": 64, "max_num_batched_tokens": 512,
                "kv_cache_memory_bytes": 32 * 2**20,
                # tests load adapters they write under the temp dir; the default allows no local path
                "adapter_roots": [tempfile.gettempdir()]}


class LoopThread:
    """An asyncio loop running forever on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class RunningServer:
    target: str
    engine: Any  # AsyncEngine (in-process core) or CoreProcessClient (core process)
    server: GrpcServer
    loop: LoopThread
    metrics_port: int = 0
    metrics_http: Any = None
    extra: list[GrpcServer] = field(default_factory=list)

    def add_server(self, config: ServerConfig, tracer_provider: TracerProvider | None = None) -> str:
        """One more gRPC server (e.g. with auth or TLS) over the same engine; returns its target."""
        async def build() -> int:
            grpc_server = GrpcServer(self.engine, config, metrics=self.server.metrics,
                                     tracer_provider=tracer_provider)
            self.extra.append(grpc_server)
            return await grpc_server.start()

        return f"localhost:{self.loop.run(build())}"

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()


def start_server(engine_kwargs: dict[str, Any] | None = None, server_kwargs: dict[str, Any] | None = None,
                 tracer_provider: TracerProvider | None = None, engine_process: bool = False) -> RunningServer:
    """Engine (demo model unless ``model`` is given) + server on 127.0.0.1:<free port> + /metrics;
    the engine core on a thread of this process, or with ``engine_process`` in a spawned process."""
    loop = LoopThread()
    config = EngineConfig.from_kwargs(**{**SMALL_ENGINE, **(engine_kwargs or {})})
    server_config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "metrics_host": "127.0.0.1",
                                    "grace_period": 5.0, "health_poll_seconds": 0.1, **(server_kwargs or {})})

    async def build() -> RunningServer:
        engine = CoreProcessClient(config) if engine_process else AsyncEngine(config)
        await engine.start()
        grpc_server = GrpcServer(engine, server_config, tracer_provider=tracer_provider)
        port = await grpc_server.start()
        http, metrics_port = grpc_server.metrics.serve("127.0.0.1", 0)
        return RunningServer(f"127.0.0.1:{port}", engine, grpc_server, loop, metrics_port, http)

    return loop.run(build(), timeout=300)


def stop_server(rs: RunningServer) -> None:
    async def stop() -> None:
        for grpc_server in [rs.server, *rs.extra]:
            await grpc_server.stop()
        await rs.engine.shutdown()

    rs.loop.run(stop())
    rs.loop.close()
    rs.metrics_http.shutdown()


def chat_request(text: str, adapter: str = "", max_tokens: int = 48, request_id: str = "",
                 **params: Any) -> pb.GenerateRequest:
    """A greedy one-message chat request, the shape the demo adapters were trained on."""
    sampling = pb.SamplingParameters(**{"max_tokens": max_tokens, "temperature": 0.0, **params})
    return pb.GenerateRequest(request_id=request_id, adapter=adapter, params=sampling,
                              chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content=text)]))


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pb.GenerateResponse]:
    """The remaining messages of a call read with ``read()`` (iteration and read() may not mix)."""
    chunks = []
    while (chunk := await call.read()) != grpc.aio.EOF:
        chunks.append(chunk)
    return chunks

@functools.cache
def demo_tokenizer() -> Any:
    """The demo model's tokenizer, loaded apart from the server (the reference in tests)."""
    from transformers import AutoTokenizer

    from loraplex.backend.demo import DEMO_MODEL_DIR

    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
