"""OpenAI-shaped errors: one exception type, one gRPC → HTTP mapping, one JSON shape.

Every error the gateway returns is ``{"error": {"message", "type", "param", "code"}}``
with the HTTP status the OpenAI SDKs turn into their typed exceptions
(400 → BadRequestError, 401 → AuthenticationError, 404 → NotFoundError, ...).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc
from pydantic import ValidationError

log = logging.getLogger("loraplex.gateway")

# gRPC status → (HTTP status, OpenAI error type)
_GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error"),
    grpc.StatusCode.ABORTED: (409, "invalid_request_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    # The backend refused the gateway's own credentials: a server-side misconfiguration,
    # not the caller's bad key (that is the gateway's 401).
    grpc.StatusCode.UNAUTHENTICATED: (502, "server_error"),
}

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _HTTP_TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


BACKEND_UNREACHABLE = "The backend is unreachable; retry later."
# gRPC's own transport messages name peers ("ipv4:10.0.0.5:50051", "unix:/run/x.sock"): never shown
_TRANSPORT_DETAIL = re.compile(r"failed to connect|connection (refused|reset)|socket closed|\b(ipv4|ipv6|unix|dns):",
                               re.IGNORECASE)


def from_grpc(err: grpc.aio.AioRpcError | grpc.RpcError, *, model: str | None = None) -> OpenAIError:
    """Maps a backend status to the HTTP status and OpenAI error the SDKs expect."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    if is_transport_failure(details):
        log.warning("backend call failed: %s: %s", code.name, details)
        return OpenAIError(503, BACKEND_UNREACHABLE, code="backend_unavailable", type="server_error")
    if code == grpc.StatusCode.NOT_FOUND and model is not None:
        out = model_not_found(model)
        out.message = f"{out.message} ({details})"
        return out
    status, err_type = _GRPC_TO_HTTP.get(code, (500, "server_error"))
    param = _param_from_details(details) if status == 400 else None
    return OpenAIError(status, details, param=param, code=code.name.lower(), type=err_type)


def is_transport_failure(details: str) -> bool:
    """True for gRPC's connection errors (whose text names backend addresses), not the backend's own."""
    return bool(_TRANSPORT_DETAIL.search(details))


def _param_from_details(details: str) -> str | None:
    """The backend names the bad field first ("temperature: must be in [0, 2], got 3")."""
    head, sep, _ = details.partition(":")
    if sep and head and all(c.isalnum() or c in "_.[]" for c in head):
        return head
    return None


def from_validation(err: ValidationError) -> OpenAIError:
    """The first pydantic error as OpenAI's 400, with ``param`` in OpenAI's path style."""
    first = err.errors(include_url=False)[0]
    param = loc_to_param(first.get("loc", ()))
    message = first.get("msg", "invalid value")
    ctx = first.get("ctx") or {}
    if isinstance(ctx.get("error"), OpenAIError):
        inner: OpenAIError = ctx["error"]
        return OpenAIError(inner.status, inner.message, param=inner.param or param, code=inner.code)
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    message = _bound_message(first.get("type", ""), ctx, first.get("input")) or message
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    text = f"Invalid '{param}': {message}" if param else message
    return OpenAIError(400, text, param=param, code=code)


_BOUNDS = {"less_than_equal": ("le", "<=", "above maximum value"),
           "less_than": ("lt", "<", "above maximum value"),
           "greater_than_equal": ("ge", ">=", "below minimum value"),
           "greater_than": ("gt", ">", "below minimum value")}


def _bound_message(err_type: str, ctx: dict[str, Any], value: Any) -> str | None:
    """OpenAI's wording: decimal above maximum value. Expected a value <= 2, but got 3 instead."""
    if err_type not in _BOUNDS:
        return None
    key, op, what = _BOUNDS[err_type]
    kind = "integer" if isinstance(value, int) else "decimal"
    bound = ctx.get(key)
    if isinstance(bound, float) and bound.is_integer():
        bound = int(bound)
    return f"{kind} {what}. Expected a value {op} {bound}, but got {value} instead."


def loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """pydantic's ``("messages", 0, "role")`` → OpenAI's ``messages.[0].role``."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and not _is_union_tag(item):
            parts.append(item)
    return ".".join(parts) or None


def _is_union_tag(item: str) -> bool:
    # pydantic adds the union member's type name to ``loc`` ("str", "list[int]", "function-after[...]")
    return item in {"str", "int", "float", "bool", "list", "dict"} or "[" in item or item.startswith("function-")
