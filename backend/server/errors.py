"""The one place that turns exceptions into gRPC status codes, for unary and streaming handlers.

Every servicer method is wrapped in ``@grpc_errors``:

- ``LoraplexError`` → ``grpc.StatusCode[err.status]`` with the error's message;
- a request that did not parse (see ``tolerant_deserializer``) → INVALID_ARGUMENT;
- ``context.abort`` from inside the handler passes through untouched;
- cancellation (client cancel, deadline, disconnect) propagates, so the
  engine's iterator is closed and the request aborted;
- anything else → INTERNAL with a generic message; the traceback goes to the log.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from loraplex.backend.server.messages import Msg
from loraplex.errors import InvalidRequestError, LoraplexError

log = logging.getLogger("loraplex.server")
M = TypeVar("M", bound=Message)


@dataclass
class MalformedRequest:
    """Stands in for a request whose bytes did not parse."""

    error: str


def tolerant_deserializer(message_type: type[M]) -> Callable[[bytes], M | MalformedRequest]:
    """A deserializer that never raises, so bad bytes get INVALID_ARGUMENT rather than INTERNAL."""

    def parse(data: bytes) -> M | MalformedRequest:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return MalformedRequest(str(exc) or type(exc).__name__)

    return parse


class MalformedLog:
    """Logs malformed requests once per kind (service) per ``period`` seconds, without a traceback,
    so a flood of bad bytes cannot flood the log."""

    def __init__(self, period: float = 60.0) -> None:
        self.period = period
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self.suppressed = 0

    def note(self, kind: str, error: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.period:
                self.suppressed += 1
                return
            self._last[kind] = now
        log.warning(Msg.MALFORMED_LOGGED.format(kind=kind, error=error[:200], period=self.period))


MALFORMED_LOG = MalformedLog()


async def refuse_malformed(context: grpc.aio.ServicerContext, kind: str, request: MalformedRequest) -> None:
    """INVALID_ARGUMENT for bytes that did not parse, logged at most once per kind and period."""
    MALFORMED_LOG.note(kind, request.error)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, Msg.MALFORMED_REQUEST.format(error=request.error))


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code a user-facing error maps to."""
    if isinstance(exc, LoraplexError):
        return grpc.StatusCode[exc.status]
    return grpc.StatusCode.INTERNAL


def _check_parsed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidRequestError("request", Msg.MALFORMED_REQUEST.format(error=request.error))


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, LoraplexError):
        await context.abort(status_of(exc), exc.message)
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, Msg.INTERNAL.format(method=method))


def grpc_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a servicer method (coroutine or async generator) with the one error mapping."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                _check_parsed(request)
                async with contextlib.aclosing(fn(self, request, context)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, fn.__name__)

        return stream

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_parsed(request)
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__)

    return unary
