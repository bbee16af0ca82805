"""The ``loraplex serve`` process: engine + gRPC server + /metrics + tracing + signals.

SIGTERM / SIGINT drain gracefully (see ``GrpcServer.drain_and_stop``); the
process then exits 0. A second signal during the drain stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from loraplex.backend.engine.llm_engine import tune_gc
from loraplex.backend.engine.protocol import EngineClient
from loraplex.backend.server.config import ServerConfig
from loraplex.backend.server.server import GrpcServer
from loraplex.backend.tracing import configure_tracing
from loraplex.config import EngineConfig

log = logging.getLogger("loraplex.server")


def engine_client(engine_config: EngineConfig, server_config: ServerConfig) -> EngineClient:
    """The core in a process of its own (default), or on a thread of this one."""
    if server_config.engine_process:
        from loraplex.backend.engine.core_process import CoreProcessClient

        return CoreProcessClient(engine_config)
    from loraplex.backend.engine.async_engine import AsyncEngine

    return AsyncEngine(engine_config)


async def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Runs until a signal has drained and stopped the server; returns the exit code."""
    engine = engine_client(engine_config, server_config)
    await engine.start()
    provider = configure_tracing()
    server = GrpcServer(engine, server_config, tracer_provider=provider)
    metrics_http = None
    try:
        if server_config.metrics_port is not None:
            metrics_http, metrics_port = server.metrics.serve(server_config.metrics_host, server_config.metrics_port)
            print(f"loraplex: metrics on http://{server_config.metrics_host}:{metrics_port}/metrics", flush=True)
        port = await server.start()
        tune_gc()  # what is loaded by now lives as long as the server: out of the cyclic collector's walks
        print(f"loraplex: serving {engine.model_name} on {server_config.host}:{port}", flush=True)
        _install_signal_handlers(server)
        await server.wait_stopped()
    finally:
        await engine.shutdown()
        if metrics_http is not None:
            metrics_http.shutdown()
        if provider is not None:
            provider.shutdown()
    return 0


def _install_signal_handlers(server: GrpcServer) -> None:
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if tasks:
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            tasks.append(loop.create_task(server.stop()))
            return
        log.info("%s: draining (grace %.1fs)", signal.Signals(signum).name, server.config.grace_period)
        tasks.append(loop.create_task(server.drain_and_stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def run(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    return asyncio.run(serve(engine_config, server_config))
