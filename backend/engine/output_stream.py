"""One request's outputs on their way from the dispatcher to the request's consumer.

The dispatcher (the core's output reader) never waits and never queues one object
per token: ``put`` hands a delta over at once when the consumer is waiting for
one, and otherwise merges it into the delta the consumer has not taken yet. A
consumer that keeps up (one stream, an idle server) gets every token as soon as
it exists; one that falls behind (a busy event loop, a gRPC write still in
flight, a slow client) gets everything that accumulated as one delta, so the
front end's cost follows the number of stream messages it can send rather than
the number of tokens the engine makes (as vLLM's RequestOutputCollector does).
"""

from __future__ import annotations

import asyncio
import dataclasses

from loraplex.backend.engine.engine_core import Emitted, RequestFailure
from loraplex.backend.outputs import Logprob, RequestOutput


class OutputStream:
    """Deltas of one request, merged while nobody takes them; ``get`` returns all of them as one."""

    __slots__ = ("_last", "_ids", "_texts", "_logprobs", "_prompt_logprobs", "_merged", "_failure", "_waiter")

    def __init__(self) -> None:
        self._last: RequestOutput | None = None  # the newest delta not yet taken
        self._ids: list[int] = []  # older deltas not yet taken, merged (only when ``_merged``)
        self._texts: list[str] = []
        self._logprobs: list[Logprob] | None = None
        self._prompt_logprobs: list[Logprob | None] | None = None
        self._merged = False
        self._failure: RequestFailure | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Emitted) -> None:
        """Adds a delta (or the request's failure); wakes the consumer if it waits. Never blocks."""
        if isinstance(item, RequestFailure):
            self._failure = item
        elif self._last is None:
            self._last = item
        elif not self._last.finished:  # nothing follows a final delta
            self._merge(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def failed(self) -> bool:
        """The request failed in the core (nothing to abort there)."""
        return self._failure is not None

    async def get(self) -> RequestOutput:
        """Everything that arrived since the last call, as one delta; raises the request's failure
        once the deltas before it are taken."""
        while self._last is None:
            if self._failure is not None:
                raise self._failure.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take()

    def _merge(self, newer: RequestOutput) -> None:
        last = self._last
        assert last is not None
        if not self._merged:  # the first delta to wait: copy it, never change the engine's objects
            self._merged = True
            self._ids = list(last.new_token_ids)
            self._texts = [last.new_text]
            self._logprobs = list(last.new_logprobs) if last.new_logprobs is not None else None
            self._prompt_logprobs = last.prompt_logprobs
        self._ids += newer.new_token_ids
        self._texts.append(newer.new_text)
        if newer.new_logprobs is not None:
            if self._logprobs is None:
                self._logprobs = []
            self._logprobs += newer.new_logprobs
        if self._prompt_logprobs is None:
            self._prompt_logprobs = newer.prompt_logprobs
        self._last = newer

    def _take(self) -> RequestOutput:
        out = self._last
        assert out is not None
        self._last = None
        if self._merged:  # the newest delta's state (finish, usage, timings) with every token since the last take
            self._merged = False
            out = dataclasses.replace(out, new_token_ids=self._ids, new_text="".join(self._texts),
                                      new_logprobs=self._logprobs, prompt_logprobs=self._prompt_logprobs)
        return out
