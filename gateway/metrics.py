"""The gateway's own Prometheus metrics (``/metrics``), every name prefixed ``loraplex_gateway_``.

A pure ASGI middleware counts every HTTP request by route and status and times it to
its last byte (a stream's whole length); the handlers add time to first token, tokens
and backend errors. Each app has its own registry, so tests can build several apps.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/health", "/metrics")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_gateway_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.duration = Histogram("loraplex_gateway_request_duration_seconds",
                                  "HTTP request time to the last byte, by route", ["route"],
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("loraplex_gateway_requests_in_progress", "HTTP requests being answered",
                                 ["route"], registry=r)
        self.ttft = Histogram("loraplex_gateway_time_to_first_token_seconds",
                              "Time from request to the backend's first message, by route", ["route"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("loraplex_gateway_tokens", "Tokens of answered requests, by kind (prompt, completion)",
                              ["kind"], registry=r)
        self.backend_errors = Counter("loraplex_gateway_backend_errors",
                                      "Errors answered for backend calls, by HTTP status", ["status"], registry=r)
        self.disconnects = Counter("loraplex_gateway_client_disconnects",
                                   "Requests whose client went away before the answer ended", registry=r)
        self.backend_requests = Counter("loraplex_gateway_backend_requests",
                                        "Generation requests sent to each backend, by its address", ["backend"],
                                        registry=r)
        self.backends_healthy = Gauge("loraplex_gateway_backends_healthy",
                                      "Backends whose last health check answered SERVING", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def add_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("completion").inc(completion_tokens)


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


class MetricsMiddleware:
    """Counts and times every HTTP request (streams until their last byte)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope.get("path", ""))
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        self.metrics.in_progress.labels(route).inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_progress.labels(route).dec()
            self.metrics.duration.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status["code"])).inc()
