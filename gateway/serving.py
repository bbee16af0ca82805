"""The flow both generation routes share: open the backend calls, then stream SSE or
answer one JSON body; cancel the calls when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loraplex.clients import pb
from loraplex.gateway import sse
from loraplex.gateway.backend import Fanout, Folded
from loraplex.gateway.errors import OpenAIError, from_validation
from loraplex.gateway.responses import Usage
from loraplex.gateway.routing import Backend
from loraplex.gateway.state import GatewayState
from loraplex.gateway.tracing import RequestSpan

M = TypeVar("M", bound=BaseModel)
CLIENT_CLOSED = 499
_POLL_S = 0.25


class Endpoint(Protocol):
    """One OpenAI request's translation, both ways."""

    route: str
    model: str
    stream: bool

    def requests(self) -> list[pb.GenerateRequest]: ...

    def on_response(self, index: int, response: pb.GenerateResponse) -> list[str]: ...

    def stream_end(self) -> list[str]: ...

    def response(self, results: list[Folded]) -> BaseModel: ...

    def usage(self) -> Usage: ...


def validate(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation(exc) from None


async def respond(request: Request, state: GatewayState, endpoint: Endpoint, span: RequestSpan) -> Response:
    """Opens the calls (errors → HTTP status), then streams or answers in one body."""
    requests = endpoint.requests()
    start = time.perf_counter()
    fan = await _open(state, endpoint, requests, span)
    state.metrics.ttft.labels(endpoint.route).observe(time.perf_counter() - start)
    if endpoint.stream:
        return StreamingResponse(_sse(fan, endpoint, state, span), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    try:
        results = await _collect_or_disconnect(request, fan, len(requests), state)
    finally:
        await _close(fan)
    if results is None:
        span.end(CLIENT_CLOSED, "client disconnected")
        return Response(status_code=CLIENT_CLOSED)
    body = endpoint.response(results)
    _count_usage(state, endpoint)
    span.end(200)
    return JSONResponse(body.model_dump())


async def _open(state: GatewayState, endpoint: Endpoint, requests: list[pb.GenerateRequest],
                span: RequestSpan) -> Fanout:
    """Opens all n calls on one backend (the adapter's affinity choice, or the least loaded); when
    that backend is unavailable and others are known, marks it unhealthy and tries the next once."""
    adapter = requests[0].adapter if requests else ""
    tried: list[Backend] = []
    while True:
        lease = state.router.lease(adapter, len(requests), exclude=tried)
        fan = Fanout(lease.client, requests, model=endpoint.model, timeout=state.config.request_timeout,
                     metadata=span.metadata, on_close=lease.release)
        try:
            await fan.open()
            return fan
        except OpenAIError as err:
            tried.append(lease.backend)
            if err.status == 503 and len(tried) < min(2, len(state.router.backends)):
                state.router.mark_unhealthy(lease.backend)
                continue
            state.metrics.backend_errors.labels(str(err.status)).inc()
            raise


async def _collect(fan: Fanout, n: int) -> list[Folded]:
    results = [Folded() for _ in range(n)]
    async for event in fan.events():
        if event.error is not None:
            raise event.error
        assert event.response is not None
        results[event.index].add(event.response)
    return results


async def _collect_or_disconnect(request: Request, fan: Fanout, n: int,
                                 state: GatewayState) -> list[Folded] | None:
    """The folded results, or None when the client disconnected first (the calls are cancelled)."""
    task = asyncio.create_task(_collect(fan, n))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                state.metrics.disconnects.inc()
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _sse(fan: Fanout, endpoint: Endpoint, state: GatewayState, span: RequestSpan) -> AsyncIterator[str]:
    status, error = 200, None
    try:
        async for event in fan.events():
            if event.error is not None:
                raise event.error
            assert event.response is not None
            for payload in endpoint.on_response(event.index, event.response):
                yield payload
        for payload in endpoint.stream_end():
            yield payload
        _count_usage(state, endpoint)
        yield sse.DONE
    except OpenAIError as err:
        status, error = err.status, err.message
        state.metrics.backend_errors.labels(str(err.status)).inc()
        yield sse.error_event(err)
        yield sse.DONE
    except (asyncio.CancelledError, GeneratorExit):
        status, error = CLIENT_CLOSED, "client disconnected"
        state.metrics.disconnects.inc()
        raise
    finally:
        await _close(fan)
        span.end(status, error)


async def _close(fan: Fanout) -> None:
    """Cancels the calls even while this task is being cancelled."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(fan.close())


def _count_usage(state: GatewayState, endpoint: Endpoint) -> None:
    usage = endpoint.usage()
    state.metrics.add_usage(usage.prompt_tokens, usage.completion_tokens)


def total_usage(usages: list[pb.Usage | None], per_prompt: int) -> Usage:
    """Prompt tokens once per prompt (choices of one prompt share it), completion tokens summed."""
    total = Usage()
    for i, u in enumerate(usages):
        if u is None:
            continue
        first = i % per_prompt == 0
        total.add(u.prompt_tokens if first else 0, u.completion_tokens, u.cached_tokens if first else 0)
    if total.prompt_tokens_details is None:
        total.add(0, 0, 0)
    return total
