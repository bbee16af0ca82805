"""Assembles the gRPC server: servicer, health, reflection, auth, TLS, graceful drain.

    server = GrpcServer(engine, ServerConfig(port=0))
    port = await server.start()
    ...
    await server.drain_and_stop()          # what SIGTERM does

Drain: health NOT_SERVING ("" and the service), the engine stops admitting
(new Generate → UNAVAILABLE), in-flight requests get up to ``grace_period``
seconds to finish, then the server stops (cancelling what is left).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider

from loraplex.backend.metrics import Metrics
from loraplex.backend.server.auth import AuthInterceptor
from loraplex.backend.server.config import ServerConfig
from loraplex.backend.server.errors import tolerant_deserializer
from loraplex.backend.server.health import HEALTH_SERVICE, SERVICE_NAME, EngineHealth, health_handler
from loraplex.backend.server.reflection import reflection_handlers
from loraplex.backend.server.servicer import ControlServicer, InferenceServicer
from loraplex.backend.tracing import get_tracer
from loraplex.clients.v1 import inference_pb2 as pb

log = logging.getLogger("loraplex.server")

_METHODS: dict[str, tuple[Any, Any, bool]] = {  # name: (request type, response type, server-streaming)
    "Generate": (pb.GenerateRequest, pb.GenerateResponse, True),
    "LoadAdapter": (pb.LoadAdapterRequest, pb.LoadAdapterResponse, False),
    "UnloadAdapter": (pb.UnloadAdapterRequest, pb.UnloadAdapterResponse, False),
    "ListAdapters": (pb.ListAdaptersRequest, pb.ListAdaptersResponse, False),
    "GetServerInfo": (pb.GetServerInfoRequest, pb.GetServerInfoResponse, False),
    "Tokenize": (pb.TokenizeRequest, pb.TokenizeResponse, False),
    "Detokenize": (pb.DetokenizeRequest, pb.DetokenizeResponse, False),
    "Abort": (pb.AbortRequest, pb.AbortResponse, False),
    "GetLoad": (pb.GetLoadRequest, pb.GetLoadResponse, False),
    "ResetPrefixCache": (pb.ResetPrefixCacheRequest, pb.ResetPrefixCacheResponse, False),
}


def service_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The service's handlers, with deserializers that turn bad bytes into INVALID_ARGUMENT."""
    handlers = {}
    for name, (request_type, response_type, streaming) in _METHODS.items():
        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(getattr(servicer, name), request_deserializer=tolerant_deserializer(request_type),
                              response_serializer=response_type.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and, with a client CA, mutual TLS) credentials from the configured PEM files."""
    if not config.tls:
        return None
    assert config.tls_cert_file is not None and config.tls_key_file is not None
    pair = (Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


class GrpcServer:
    """One engine behind one ``grpc.aio`` server (create and start it inside the serving event loop)."""

    def __init__(self, engine: Any, config: ServerConfig, *, metrics: Metrics | None = None,
                 tracer_provider: TracerProvider | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics or Metrics(engine.stats, model_name=engine.model_name, vllm=config.vllm_metrics)
        self.health = EngineHealth(engine.is_healthy, config.health_poll_seconds)
        features = tuple(f for f, on in (("auth", config.api_key), ("tls", config.tls),
                                         ("reflection", config.reflection)) if on)
        self.servicer = ControlServicer(engine, self.metrics, get_tracer(tracer_provider), features)
        self.server = self._build()
        self.port = 0
        self._stopped = asyncio.Event()

    def _build(self) -> grpc.aio.Server:
        cfg = self.config
        interceptors = [AuthInterceptor(cfg.api_key, protect_health=cfg.auth_health_checks)] if cfg.api_key else []
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(interceptors=interceptors, options=options,
                                 maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        server.add_generic_rpc_handlers((service_handler(self.servicer), health_handler(self.health.servicer)))
        if cfg.reflection:
            server.add_generic_rpc_handlers(tuple(reflection_handlers((SERVICE_NAME, HEALTH_SERVICE))))
        return server

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port."""
        address = f"{self.config.host}:{self.config.port}"
        creds = server_credentials(self.config)
        self.port = (self.server.add_secure_port(address, creds) if creds is not None
                     else self.server.add_insecure_port(address))
        await self.server.start()
        await self.health.start()
        log.info("gRPC server listening on %s:%d%s", self.config.host, self.port, " (TLS)" if creds else "")
        return self.port

    async def drain_and_stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new work, let in-flight requests finish, stop."""
        if self.servicer.draining:
            await self._stopped.wait()
            return
        grace = self.config.grace_period if grace is None else grace
        deadline = time.monotonic() + grace
        self.servicer.draining = True
        await self.health.enter_draining()
        self.engine.start_draining()
        log.info("draining: %d requests in flight, grace %.1fs", self.engine.num_unfinished(), grace)
        while self.engine.num_unfinished() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(max(1.0, deadline - time.monotonic()))
        self._stopped.set()
        log.info("gRPC server stopped")

    async def stop(self) -> None:
        """Immediate stop (tests, errors): cancels in-flight calls."""
        await self.health.stop()
        await self.server.stop(None)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
