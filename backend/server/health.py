"""``grpc.health.v1.Health`` that follows the engine.

Both the server-wide name ("") and ``loraplex.v1.InferenceService`` report
SERVING only while the engine says it is healthy (its loop alive, no step
stuck). A background task asks ``engine.is_healthy()`` every
``poll_seconds``; draining turns both NOT_SERVING for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from loraplex.backend.server.errors import MalformedRequest, refuse_malformed, tolerant_deserializer

log = logging.getLogger("loraplex.server")

SERVICE_NAME = "loraplex.v1.InferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
SERVICES = ("", SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EngineHealth:
    """Owns the health servicer's statuses; ``start()`` begins following ``is_healthy``."""

    def __init__(self, is_healthy: Callable[[], bool], poll_seconds: float = 0.5) -> None:
        self.servicer = health.aio.HealthServicer()
        self._is_healthy = is_healthy
        self._poll = poll_seconds
        self._task: asyncio.Task[None] | None = None
        self._serving: bool | None = None
        self.draining = False

    async def start(self) -> None:
        await self._update()
        self._task = asyncio.create_task(self._follow(), name="loraplex-health")

    async def _follow(self) -> None:
        while not self.draining:
            await asyncio.sleep(self._poll)
            await self._update()

    async def _update(self) -> None:
        try:
            healthy = bool(self._is_healthy())
        except Exception:
            log.exception("engine health check failed")
            healthy = False
        if self.draining:
            return
        if healthy != self._serving:
            if self._serving is not None:
                log.warning("engine health changed: %s", "SERVING" if healthy else "NOT_SERVING")
            self._serving = healthy
            await self._set_all(SERVING if healthy else NOT_SERVING)

    async def _set_all(self, status: int) -> None:
        for name in SERVICES:
            await self.servicer.set(name, status)

    async def enter_draining(self) -> None:
        """NOT_SERVING from now on, whatever the engine says."""
        self.draining = True
        self._serving = False
        await self._set_all(NOT_SERVING)
        await self.stop()

    async def stop(self) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None


def health_handler(servicer: health.aio.HealthServicer) -> grpc.GenericRpcHandler:
    """The health service with a deserializer that never raises: bad bytes get INVALID_ARGUMENT
    and one rate-limited log line instead of a traceback each."""
    parse = tolerant_deserializer(health_pb2.HealthCheckRequest)

    async def check(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await refuse_malformed(context, "health", request)
        return await servicer.Check(request, context)

    async def watch(request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, MalformedRequest):
            await refuse_malformed(context, "health", request)
        await servicer.Watch(request, context)

    serialize = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
        "Check": grpc.unary_unary_rpc_method_handler(check, request_deserializer=parse,
                                                     response_serializer=serialize),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, request_deserializer=parse,
                                                      response_serializer=serialize)})
