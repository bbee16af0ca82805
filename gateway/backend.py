"""Runs the backend Generate calls of one OpenAI request and merges their streams.

Every call is opened and its first message awaited before any HTTP answer starts,
so bad input, unknown adapters and a full queue become proper HTTP statuses; later
failures reach the caller as an SSE error event. Closing a ``Fanout`` (the client went
away, or the handler is cancelled) cancels every gRPC call it still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from loraplex.clients import pb
from loraplex.clients.common import Metadata
from loraplex.gateway.errors import OpenAIError, from_grpc


class GenerateClient(Protocol):
    def generate_stream(self, request: pb.GenerateRequest, *, timeout: float | None = None,
                        metadata: Metadata | None = None) -> AsyncIterator[pb.GenerateResponse]: ...


@dataclass
class Event:
    """One message of choice ``index``; ``error`` set when its call failed mid-stream."""

    index: int
    response: pb.GenerateResponse | None = None
    error: OpenAIError | None = None


class Fanout:
    """The n concurrent Generate calls of one OpenAI request."""

    def __init__(self, client: GenerateClient, requests: list[pb.GenerateRequest], *, model: str,
                 timeout: float | None = None, metadata: Metadata | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self._client = client
        self._on_close = on_close
        self._requests = requests
        self._model = model
        self._timeout = timeout
        self._metadata = metadata
        self._streams: list[AsyncIterator[pb.GenerateResponse]] = []
        self._firsts: list[pb.GenerateResponse] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()

    async def open(self) -> None:
        """Starts every call and waits for each one's first message; raises OpenAIError."""
        self._streams = [self._client.generate_stream(r, timeout=self._timeout, metadata=self._metadata)
                         for r in self._requests]
        firsts = [asyncio.ensure_future(_first(s)) for s in self._streams]
        # the first refusal (a full queue, a bad field) answers at once; the other calls are cancelled
        try:
            await asyncio.wait(firsts, return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:  # cancelled (the client left): end the calls and release the backend
            for f in firsts:
                f.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self.close())
            raise
        failed = next((f for f in firsts if f.done() and not f.cancelled() and f.exception() is not None), None)
        if failed is not None:
            for f in firsts:
                f.cancel()
            await asyncio.gather(*firsts, return_exceptions=True)
            await self.close()
            raise self._map(failed.exception())  # type: ignore[arg-type]
        self._firsts = [f.result() for f in firsts]

    async def events(self) -> AsyncIterator[Event]:
        """Every message of every call, in arrival order; ends when all calls finished."""
        self._tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self._streams))]
        remaining = len(self._tasks)
        while remaining:
            event = await self._queue.get()
            if event is None:
                remaining -= 1
                continue
            yield event

    async def _pump(self, index: int) -> None:
        try:
            await self._queue.put(Event(index, self._firsts[index]))
            if not self._firsts[index].finished:
                async for response in self._streams[index]:
                    await self._queue.put(Event(index, response))
                    if response.finished:
                        break
        except (grpc.RpcError, OpenAIError) as exc:
            await self._queue.put(Event(index, error=self._map(exc)))
        finally:
            await self._queue.put(None)

    def _map(self, exc: BaseException) -> OpenAIError:
        if isinstance(exc, OpenAIError):
            return exc
        if isinstance(exc, grpc.RpcError):
            return from_grpc(exc, model=self._model)
        return OpenAIError(500, f"backend call failed: {exc!r}", code="internal_error")

    async def close(self) -> None:
        """Cancels what still runs: the pump tasks, then every gRPC call; then calls ``on_close``."""
        try:
            await self._cancel()
        finally:
            if self._on_close is not None:
                self._on_close()

    async def _cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for stream in self._streams:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]


async def _first(stream: AsyncIterator[pb.GenerateResponse]) -> pb.GenerateResponse:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        raise OpenAIError(502, "the backend ended the stream without a message", code="bad_gateway") from None
