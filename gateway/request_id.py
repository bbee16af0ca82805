"""``x-request-id``: honour the caller's (when it is a plain token), else make one; answer it on
every response and hand it to the handlers, which send it to the backend as the request id."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_VALID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def pick_request_id(given: str | None) -> str:
    """The caller's id when it is 1-128 plain characters, else a fresh one."""
    if given is not None and _VALID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id") or pick_request_id(None))


class RequestIdMiddleware:
    """Outermost: every response, errors and 401s included, carries ``x-request-id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"), None)
        request_id = pick_request_id(given)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
