"""The OpenAI-compatible ASGI app: REST in front, the loraplex gRPC service behind.

    app = create_app(GatewayConfig(backend="localhost:50051"))  # or backends=[...], backend_dns="svc:50051"
    uvicorn.run(app, port=8000)

It talks to the backend only through ``loraplex.clients.AsyncClient`` and imports no
torch, transformers or server code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
from loraplex.gateway.adapters import list_models, load_lora_adapter, retrieve_model, unload_lora_adapter
from loraplex.gateway.chat import create_chat_completion
from loraplex.gateway.completions import create_completion
from loraplex.gateway.config import GatewayConfig
from loraplex.gateway.errors import BACKEND_UNREACHABLE, OpenAIError
from loraplex.gateway.metrics import GatewayMetrics, MetricsMiddleware
from loraplex.gateway.openapi import OPENAPI_PATH, UNSUPPORTED_ROUTES, install_openapi, route_doc
from loraplex.gateway.request_id import RequestIdMiddleware
from loraplex.gateway.routing import Router
from loraplex.gateway.security import ApiKeyMiddleware
from loraplex.gateway.state import BackendClient, GatewayState
from loraplex.gateway.tracing import get_tracer


def reconnect_options(max_seconds: float) -> list[tuple[str, int]]:
    """gRPC's reconnect backoff (1 s initial, x1.6, capped at 120 s by default) capped at ``max_seconds``,
    so a backend that comes back is used again within seconds, not minutes."""
    cap = max(50, int(max_seconds * 1000))
    return [("grpc.initial_reconnect_backoff_ms", min(cap, 100)), ("grpc.min_reconnect_backoff_ms", min(cap, 100)),
            ("grpc.max_reconnect_backoff_ms", cap)]


def create_app(config: GatewayConfig, *, tracer_provider: TracerProvider | None = None) -> FastAPI:
    """The gateway app; the backend clients are made at startup (and as DNS changes) and closed at shutdown.
    Raises ConfigError when a certificate file cannot be read."""
    metrics = GatewayMetrics()
    tracer = get_tracer(tracer_provider)
    tls = config.tls()
    options = reconnect_options(config.backend_reconnect_seconds)

    def client(address: str) -> BackendClient:
        return AsyncClient(address, token=config.backend_token, root_certificates=tls.root_certificates,
                           private_key=tls.private_key, certificate_chain=tls.certificate_chain, options=options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        router = Router(client, static=config.static_backends(),
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
                  docs_url=None, redoc_url=None, openapi_url=OPENAPI_PATH)
    _add_routes(app, metrics)
    install_openapi(app, secured=bool(config.api_key))
    _add_error_handlers(app)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "traceparent", "tracestate",
                                          "x-request-id"], expose_headers=["x-request-id"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    return app


def _add_routes(app: FastAPI, metrics: GatewayMetrics) -> None:
    for path, handler, method in [
        ("/v1/models", list_models, "GET"),
        ("/v1/models/{model:path}", retrieve_model, "GET"),
        ("/v1/completions", create_completion, "POST"),
        ("/v1/chat/completions", create_chat_completion, "POST"),
        ("/v1/load_lora_adapter", load_lora_adapter, "POST"),
        ("/v1/unload_lora_adapter", unload_lora_adapter, "POST"),
        ("/health", health, "GET"),
    ]:
        app.add_api_route(path, handler, methods=[method], **route_doc(path))
    for path in UNSUPPORTED_ROUTES:
        app.add_api_route(path, not_supported, methods=["POST"], **route_doc(path))

    async def metrics_route() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics_route, methods=["GET"], **route_doc("/metrics"))


async def not_supported(request: Request) -> Response:
    """OpenAI endpoints this gateway does not implement: OpenAI's error shape, not a bare 404."""
    return _error(OpenAIError(404, f"{request.url.path} is not supported by this server (a loraplex gateway "
                                   "serves completions and chat completions).", code="unsupported_endpoint"))


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
        return _error(OpenAIError(503, BACKEND_UNREACHABLE, code="backend_unavailable"))
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
