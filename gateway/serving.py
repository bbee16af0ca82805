"""The flow both generation routes share: open the backend calls, then stream SSE or
answer one JSON body; cancel the calls when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loraplex.clients import GenerateResult, pb
from loraplex.gateway import sse
from loraplex.gateway.backend import Fanout
from loraplex.gateway.endpoint import GenerationEndpoint, check_not_aborted
from loraplex.gateway.errors import OpenAIError, bad_request, from_validation
from loraplex.gateway.protocol import SamplingFields
from loraplex.gateway.request_id import request_id_of
from loraplex.gateway.routing import Backend
from loraplex.gateway.security import read_json
from loraplex.gateway.state import GatewayState, Target
from loraplex.gateway.structured import relabel_errors
from loraplex.gateway.tracing import RequestSpan

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R", bound=SamplingFields)
CLIENT_CLOSED = 499
_POLL_S = 0.25
AT_CAPACITY = "The backend is at capacity; retry later."


async def handle(request: Request, request_type: type[R],
                 make: Callable[[R, Target, GatewayState, str], GenerationEndpoint]) -> Response:
    """A generation route: validate, resolve the model, check the backend's limits, then respond;
    the request's span covers it all and carries the GenAI attributes."""
    state: GatewayState = request.app.state.gateway
    route = request.url.path
    if state.backends_full():  # a flood's 429s cost only this: the body is not even read
        state.metrics.backend_errors.labels("429").inc()
        raise OpenAIError(429, AT_CAPACITY, code="resource_exhausted")
    span = state.span(f"POST {route}", request.headers)
    try:
        req = validate(request_type, await read_json(request, state.config.max_request_bytes))
        if req.model:
            span.set("gen_ai.request.model", req.model)
        target = await state.target(req.model)
        check_limits(req, (await state.model_info()).limits, state.config.max_choices)
        endpoint = make(req, target, state, request_id_of(request))
        endpoint.start_span(span)
        with relabel_errors(endpoint.constraint):
            return await respond(request, state, endpoint, span)
    except OpenAIError as err:
        span.end(err.status, err.message)
        raise
    except Exception as exc:
        span.end(500, repr(exc))
        raise


def validate(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation(exc) from None


async def respond(request: Request, state: GatewayState, endpoint: GenerationEndpoint,
                  span: RequestSpan) -> Response:
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
    endpoint.annotate(span)
    span.end(200)
    return JSONResponse(body.model_dump())


async def _open(state: GatewayState, endpoint: GenerationEndpoint, requests: list[pb.GenerateRequest],
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


async def _collect(fan: Fanout, n: int) -> list[GenerateResult]:
    results = [GenerateResult() for _ in range(n)]
    async for event in fan.events():
        if event.error is not None:
            raise event.error
        assert event.response is not None
        check_not_aborted(event.response)
        results[event.index].add(event.response)
    return results


async def _collect_or_disconnect(request: Request, fan: Fanout, n: int,
                                 state: GatewayState) -> list[GenerateResult] | None:
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


async def _sse(fan: Fanout, endpoint: GenerationEndpoint, state: GatewayState,
               span: RequestSpan) -> AsyncIterator[str]:
    status, error = 200, None
    try:
        async for event in fan.events():
            if event.error is not None:
                raise event.error
            assert event.response is not None
            check_not_aborted(event.response)
            for payload in endpoint.on_response(event.index, event.response):
                yield payload
        for payload in endpoint.stream_end():
            yield payload
        _count_usage(state, endpoint)
        endpoint.annotate(span)
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


def _count_usage(state: GatewayState, endpoint: GenerationEndpoint) -> None:
    usage = endpoint.usage()
    state.metrics.add_usage(usage.prompt_tokens, usage.completion_tokens)


def check_limits(req: SamplingFields, limits: pb.Limits, max_choices: int) -> None:
    """The backend's published limits (GetServerInfo) and the gateway's choice bound, before any call."""
    choices = req.num_choices()
    if choices > max_choices:
        param = "n" if choices == req.n else "prompt"
        raise OpenAIError(400, f"This request asks for {choices} choices (prompts x n); at most {max_choices} "
                               "are allowed per request.", param=param, code="too_many_choices")
    if limits.max_stop_strings and len(req.stops) > limits.max_stop_strings:
        raise bad_request(f"at most {limits.max_stop_strings} stop sequences, got {len(req.stops)}", "stop")
    asked, param = req.logprobs_asked()
    if limits.max_logprobs and asked is not None and asked > limits.max_logprobs:
        raise bad_request(f"integer above maximum value. Expected a value <= {limits.max_logprobs}, but got "
                          f"{asked} instead.", param)
