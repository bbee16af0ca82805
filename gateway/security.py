"""API key check (constant time) and bounded request bodies."""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from loraplex.gateway.errors import OpenAIError, loc_to_param

OPEN_PATHS = frozenset({"/health"})  # probes carry no key; everything else needs it


def key_matches(header: str | None, api_key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.strip().encode(), api_key.encode())


class ApiKeyMiddleware:
    """Refuses every HTTP request without the key (CORS preflights and /health excepted)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if key_matches(headers.get("authorization"), self.api_key):
            await self.app(scope, receive, send)
            return
        err = OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    @staticmethod
    def _exempt(scope: Scope) -> bool:
        return scope.get("path") in OPEN_PATHS or scope.get("method") == "OPTIONS"


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON; 413 past ``max_bytes`` (checked while reading), 400 when not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise OpenAIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    _refuse_lone_surrogates(body)
    return body


def _refuse_lone_surrogates(body: Any) -> None:
    """JSON may escape a lone UTF-16 surrogate (``"\\ud800"``), which is no Unicode text and
    cannot reach the backend: 400 naming the first field that holds one."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                raise _surrogate_error(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _is_text(key):
                    raise _surrogate_error(path)
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))


def _is_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_error(path: tuple[Any, ...]) -> OpenAIError:
    param = loc_to_param(path)
    where = f" in '{param}'" if param else ""
    return OpenAIError(400, f"The request body holds a string with a lone UTF-16 surrogate{where}, which is not "
                            "valid Unicode.", param=param, code="invalid_value")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large")
