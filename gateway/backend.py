"""Runs the backend Generate calls of one OpenAI request and merges their streams.

Every call is opened and its first message awaited before any HTTP answer starts,
so bad input, unknown adapters and a full queue become proper HTTP statuses; later
failures reach the caller as an SSE error event. Closing a ``Fanout`` (the client went
away, or the handler is cancelled) cancels every gRPC call it still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from loraplex.clients import pb
from loraplex.gateway.errors import OpenAIError, from_grpc

Metadata = Sequence[tuple[str, str]]


class GenerateClient(Protocol):
    def generate_stream(self, request: pb.GenerateRequest, *, timeout: float | None = None,
                        metadata: Metadata | None = None) -> AsyncIterator[pb.GenerateResponse]: ...


@dataclass
class Event:
    """One message of choice ``index``; ``error`` set when its call failed mid-stream."""

    index: int
    response: pb.GenerateResponse | None = None
    error: OpenAIError | None = None


@dataclass
class Folded:
    """One call's whole answer: its text, logprobs and final message (reason, usage, error)."""

    text: str = ""
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    final: pb.GenerateResponse = field(default_factory=pb.GenerateResponse)

    def add(self, response: pb.GenerateResponse) -> None:
        self.text += response.text
        self.logprobs.extend(response.logprobs)
        if response.finished:
            self.final = response


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
        results = await asyncio.gather(*(_first(s) for s in self._streams), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise self._map(errors[0])
        self._firsts = [r for r in results if isinstance(r, pb.GenerateResponse)]

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


@contextlib.asynccontextmanager
async def fanout(client: GenerateClient, requests: list[pb.GenerateRequest], *, model: str,
                 timeout: float | None = None, metadata: Metadata | None = None) -> AsyncIterator[Fanout]:
    """Opens the calls; always cancels what is left on exit (also on cancellation)."""
    fan = Fanout(client, requests, model=model, timeout=timeout, metadata=metadata)
    try:
        await fan.open()
        yield fan
    finally:
        await asyncio.shield(fan.close())
