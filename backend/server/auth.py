"""Bearer-token auth for every RPC: ``authorization: Bearer <token>`` in call metadata.

Compared in constant time (``hmac.compare_digest`` on bytes). Inference,
adapter management and reflection always need the token. The standard health
service stays open by default so Kubernetes probes (which send no metadata)
work; ``ServerConfig.auth_health_checks`` closes it too.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from loraplex.backend.server.messages import Msg

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def bearer_token(metadata: tuple[Any, ...] | None) -> str | None:
    """The token of the first ``authorization: Bearer`` entry, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


def token_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the right bearer token with UNAUTHENTICATED, before any handler runs."""

    def __init__(self, token: str, *, protect_health: bool = False) -> None:
        self._token = token
        self._protect_health = protect_health

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method or ""
        if method.startswith(HEALTH_PREFIX) and not self._protect_health:
            return handler
        given = bearer_token(handler_call_details.invocation_metadata)
        if given is None:
            return _refusal(handler, Msg.UNAUTHENTICATED_MISSING.value)
        if not token_matches(given, self._token):
            return _refusal(handler, Msg.UNAUTHENTICATED_WRONG.value)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
