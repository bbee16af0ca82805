"""A real gateway (uvicorn, loopback, free port) in front of the fake gRPC backend, both on
an event loop of their own thread, so tests use sync clients (httpx, openai) from the main thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, TypeVar

import uvicorn
from fake_backend import FakeServicer, start_fake_backend
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loraplex.gateway.app import create_app
from loraplex.gateway.config import GatewayConfig
from tests.helpers import wait_until

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayHarness:
    """Starts the fake backend and the gateway; ``url`` is the gateway's base URL."""

    def __init__(self, config: GatewayConfig | None = None, *, extra_backends: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-test-loop", daemon=True)
        self.thread.start()
        self.grpc_server, self.backend, grpc_port = self.run(start_fake_backend())
        self.extras = [self.run(start_fake_backend()) for _ in range(extra_backends)]  # (server, servicer, port)
        backends = [f"127.0.0.1:{p}" for p in [grpc_port, *(e[2] for e in self.extras)]]
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        port = free_port()
        self.config = replace(config or GatewayConfig(), backend=backends, port=port)
        self.app = app = create_app(self.config, tracer_provider=provider)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.serve_task = asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        self.url = f"http://127.0.0.1:{port}"
        self._wait_started()

    @property
    def servicer(self) -> FakeServicer:
        return self.backend

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _wait_started(self) -> None:
        deadline = time.monotonic() + 20
        while not self.server.started:
            if self.serve_task.done() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start: {self.serve_task}")
            time.sleep(0.02)

    def wait_until(self, predicate: Any, timeout: float = 5.0) -> bool:
        return wait_until(predicate, timeout, interval=0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.serve_task.result(10)
        self.run(self.grpc_server.stop(0))
        for server, _, _ in self.extras:
            self.run(server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
