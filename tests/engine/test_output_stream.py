"""``OutputStream``: a consumer that waits gets each delta as it comes; one that falls behind gets
everything that piled up as one delta, in order, with the newest delta's state."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.backend.engine.engine_core import RequestFailure
from loraplex.backend.engine.output_stream import OutputStream
from loraplex.backend.outputs import Logprob, RequestOutput, RequestTimings, Usage
from loraplex.errors import EngineDeadError


def delta(i: int, finished: bool = False, logprobs: bool = False, prompt: bool = False) -> RequestOutput:
    return RequestOutput("r", [i], f"<{i}>", finished=finished, finish_reason="length" if finished else None,
                         new_logprobs=[Logprob(i, -float(i), 1)] if logprobs else None,
                         prompt_logprobs=[None, Logprob(7, -0.5, 1)] if prompt else None,
                         usage=Usage(5, i + 1, 0), timings=RequestTimings(1.0, 2.0, 3.0, 3.0 + i, 0.0))


def test_a_waiting_consumer_gets_each_delta_as_it_is() -> None:
    async def run() -> list[RequestOutput]:
        stream, got = OutputStream(), []
        consumer = asyncio.create_task(stream.get())
        await asyncio.sleep(0)
        first = delta(0)
        stream.put(first)
        got.append(await consumer)
        assert got[0] is first  # handed over untouched: no copy on the path that keeps up
        stream.put(delta(1))
        got.append(await stream.get())
        return got

    assert [o.new_token_ids for o in asyncio.run(run())] == [[0], [1]]


def test_deltas_not_taken_merge_in_order_with_the_newest_state() -> None:
    stream = OutputStream()
    sent = [delta(0, logprobs=True, prompt=True), delta(1, logprobs=True), delta(2, logprobs=True, finished=True)]
    for out in sent:
        stream.put(out)
    stream.put(delta(3))  # nothing follows a final delta
    merged = asyncio.run(stream.get())
    assert merged.new_token_ids == [0, 1, 2] and merged.new_text == "<0><1><2>"
    assert merged.new_logprobs is not None and [lp.token_id for lp in merged.new_logprobs] == [0, 1, 2]
    assert merged.prompt_logprobs == sent[0].prompt_logprobs
    assert merged.finished and merged.finish_reason == "length"
    assert merged.usage == Usage(5, 3, 0) and merged.timings.last_token == 5.0
    assert [o.new_token_ids for o in sent] == [[0], [1], [2]]  # the engine's objects are not changed


def test_merging_starts_afresh_after_each_take() -> None:
    async def run() -> list[list[int]]:
        stream, got = OutputStream(), []
        for batch in ([0, 1], [2], [3, 4, 5]):
            for i in batch:
                stream.put(delta(i))
            got.append((await stream.get()).new_token_ids)
        return got

    assert asyncio.run(run()) == [[0, 1], [2], [3, 4, 5]]


def test_a_failure_comes_after_the_deltas_before_it() -> None:
    async def run() -> None:
        stream = OutputStream()
        stream.put(delta(0))
        stream.put(delta(1))
        stream.put(RequestFailure("r", EngineDeadError("gone")))
        assert stream.failed
        assert (await stream.get()).new_token_ids == [0, 1]
        with pytest.raises(EngineDeadError, match="gone"):
            await stream.get()

    asyncio.run(run())


def test_a_waiting_consumer_wakes_on_failure() -> None:
    async def run() -> None:
        stream = OutputStream()
        consumer = asyncio.create_task(stream.get())
        await asyncio.sleep(0)
        stream.put(RequestFailure("r", EngineDeadError("gone")))
        with pytest.raises(EngineDeadError):
            await consumer

    asyncio.run(run())
