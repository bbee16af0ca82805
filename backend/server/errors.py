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
