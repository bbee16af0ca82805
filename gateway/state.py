"""What the route handlers share: the backend router (clients, health, load), the config, metrics, the tracer,
and the backend's model name and limits (cached for ``model_info_ttl`` seconds)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
from opentelemetry.trace import Tracer

from loraplex.clients import pb
from loraplex.clients.common import Metadata
from loraplex.gateway.config import GatewayConfig
from loraplex.gateway.errors import from_grpc
from loraplex.gateway.metrics import GatewayMetrics
from loraplex.gateway.reasoning import ReasoningParser
from loraplex.gateway.tool_parser import HermesToolParser
from loraplex.gateway.tracing import RequestSpan

if TYPE_CHECKING:
    from loraplex.gateway.routing import Router


class BackendClient(Protocol):
    """The part of ``loraplex.clients.AsyncClient`` the gateway uses."""

    def generate_stream(self, request: pb.GenerateRequest, *, timeout: float | None = None,
                        metadata: Metadata | None = None) -> AsyncIterator[pb.GenerateResponse]: ...

    async def load_adapter(self, name: str, source: str, revision: str = "", replace: bool = False,
                           pin: bool = False) -> pb.AdapterInfo: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def list_adapters(self) -> list[pb.AdapterInfo]: ...

    async def server_info(self) -> pb.GetServerInfoResponse: ...

    async def health(self) -> bool: ...

    async def close(self) -> None: ...


@dataclass
class ModelInfo:
    name: str  # the base model's id as callers see it
    limits: pb.Limits  # the backend's published request limits (GetServerInfo)
    fetched_at: float


@dataclass
class Target:
    """Where a request's ``model`` points: the base model (adapter "") or an adapter."""

    model: str
    adapter: str


class GatewayState:
    def __init__(self, config: GatewayConfig, router: Router, metrics: GatewayMetrics,
                 tracer: Tracer) -> None:
        self.config = config
        self.router = router
        self.metrics = metrics
        self.tracer = tracer
        self._info: ModelInfo | None = None

    async def model_info(self) -> ModelInfo:
        info = self._info
        if info is not None and time.monotonic() - info.fetched_at < self.config.model_info_ttl:
            return info
        try:
            server = await self.router.least_loaded().client.server_info()
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None
        name = self.config.served_model_name or server.model
        self._info = ModelInfo(name=name, limits=server.limits, fetched_at=time.monotonic())
        return self._info

    def backends_full(self) -> bool:
        """Whether every backend is known to be at capacity (its waiting bound plus its running batch,
        as its last GetServerInfo published them) from this gateway's own calls; no await, no call."""
        info = self._info
        if info is None:
            return False
        return self.router.all_full(info.limits.max_waiting_requests + info.limits.max_num_seqs)

    async def target(self, model: str) -> Target:
        """The base model when ``model`` is its name; else the adapter of that name."""
        info = await self.model_info()
        if model == info.name:
            return Target(model=info.name, adapter="")
        return Target(model=model, adapter=model)

    def span(self, name: str, headers: Mapping[str, str]) -> RequestSpan:
        return RequestSpan(self.tracer, name, headers)

    def reasoning_parser(self, template_kwargs: Mapping[str, object] | None) -> ReasoningParser | None:
        mode = self.config.reasoning_parser
        if mode == "none":
            return None
        thinking_off = bool(template_kwargs) and template_kwargs.get("enable_thinking") is False  # type: ignore[union-attr]
        return ReasoningParser(starts_in_reasoning=mode == "think-open" and not thinking_off)

    def tool_parser(self, tools_active: bool) -> HermesToolParser | None:
        if not tools_active or self.config.tool_parser == "none":
            return None
        return HermesToolParser()
