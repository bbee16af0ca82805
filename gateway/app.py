"""The OpenAI-compatible ASGI app: REST in front, the loraplex gRPC service behind.

    app = create_app(GatewayConfig(backend="localhost:50051"))  # or backends=[...], backend_dns="svc:50051"
    uvicorn.run(app, port=8000)

It talks to the backend only through ``loraplex.clients.AsyncClient`` and imports no
torch, transformers or server code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI
from opentelemetry.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from loraplex import __version__
from loraplex.clients import AsyncClient
from loraplex.gateway.adapters import list_models, load_lora_adapter, unload_lora_adapter
from loraplex.gateway.chat import create_chat_completion
from loraplex.gateway.completions import create_completion
from loraplex.gateway.config import GatewayConfig
from loraplex.gateway.errors import OpenAIError
from loraplex.gateway.metrics import GatewayMetrics, MetricsMiddleware
from loraplex.gateway.routing import Router
from loraplex.gateway.security import ApiKeyMiddleware
from loraplex.gateway.state import BackendClient, GatewayState
from loraplex.gateway.tracing import get_tracer

ClientFactory = Callable[[GatewayConfig, str], BackendClient]


def backend_client(config: GatewayConfig, address: str) -> BackendClient:
    return AsyncClient(address, token=config.backend_token, root_certificates=config.backend_ca,
                       private_key=config.backend_key, certificate_chain=config.backend_cert)


def create_app(config: GatewayConfig, *, client_factory: ClientFactory = backend_client,
               tracer_provider: TracerProvider | None = None) -> FastAPI:
    """The gateway app; the backend clients are made at startup (and as DNS changes) and closed at shutdown."""
    metrics = GatewayMetrics()
    tracer = get_tracer(tracer_provider)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        router = Router(lambda address: client_factory(config, address), static=config.static_backends(),
                        dns=config.backend_dns, refresh_seconds=config.backend_refresh_seconds,
                        health_seconds=config.backend_health_seconds,
                        max_imbalance=config.affinity_max_imbalance, metrics=metrics)
        await router.start()
        app.state.gateway = GatewayState(config, router, metrics, tracer)
        try:
            yield
        finally:
            await router.close()

    app = FastAPI(title="loraplex OpenAI gateway", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    _add_routes(app, metrics)
    _add_error_handlers(app)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "traceparent", "tracestate"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _add_routes(app: FastAPI, metrics: GatewayMetrics) -> None:
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    app.add_api_route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])

    async def metrics_route() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics_route, methods=["GET"])


async def health(request: Request) -> Response:
    """200 when at least one backend reports SERVING, else 503 (draining, engine dead, unreachable)."""
    state: GatewayState = request.app.state.gateway
    backends = list(state.router.backends.values())
    if not backends:
        return _error(OpenAIError(503, "no backend is known (DNS found none yet)", code="backend_unavailable"))
    results = await asyncio.gather(*(b.client.health() for b in backends), return_exceptions=True)
    if any(r is True for r in results):
        return Response(status_code=200)
    unreachable = [r for r in results if isinstance(r, BaseException)]
    if len(unreachable) == len(results):
        exc = unreachable[0]
        if not isinstance(exc, grpc.RpcError):
            raise exc
        detail = exc.details() if hasattr(exc, "details") else str(exc)  # type: ignore[attr-defined]
        return _error(OpenAIError(503, f"backend unreachable: {detail}", code="backend_unavailable"))
    return _error(OpenAIError(503, "backend is not serving", code="backend_not_serving"))


def _error(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _add_error_handlers(app: FastAPI) -> None:
    async def on_openai_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIError)
        return _error(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return _error(OpenAIError(exc.status_code, str(exc.detail), code=code))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return _error(OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
