"""A stream whose consumer falls behind gets the tokens that accumulated as one message: every
token still arrives exactly once and in order, with its text, through a real gRPC server (the
engine core in its own process, and on a thread of the server's)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from loraplex.backend.demo import expected_output
from loraplex.clients import AsyncClient, pb
from tests.server.harness import (
    RunningServer,
    chat_request,
    demo_tokenizer,
    read_rest,
    start_server,
    stop_server,
)

HOLD_SECONDS = 0.5  # the server's event loop is held this long while the engine goes on generating
ECHO = [("", "coalesce me"), ("upper", "hello there"), ("reverse", "in order")]


@pytest.fixture(scope="module", params=["core_process", "in_process"])
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    rs = start_server(engine_process=request.param == "core_process")
    yield rs
    stop_server(rs)


def hold_event_loop(rs: RunningServer) -> None:
    """Blocks the server's event loop (a stand-in for a front end that falls behind); the core
    keeps stepping, so its outputs pile up for the streams."""
    rs.loop.loop.call_soon_threadsafe(time.sleep, HOLD_SECONDS)


async def stream_held(rs: RunningServer, requests: list[pb.GenerateRequest]) -> list[list[pb.GenerateResponse]]:
    """Every stream's messages, the loop held once all of them have sent their first."""
    async with AsyncClient(rs.target) as client:
        calls = [client.stub.Generate(r, timeout=120) for r in requests]
        firsts = [await call.read() for call in calls]
        assert all(f != grpc.aio.EOF for f in firsts)
        hold_event_loop(rs)
        return [[first, *await read_rest(call)] for first, call in zip(firsts, calls, strict=True)]


def test_coalesced_streams_deliver_every_token_once_and_in_order(server: RunningServer) -> None:
    echo = [chat_request(text, adapter, max_tokens=64) for adapter, text in ECHO]
    long = [chat_request(f"long {i}", max_tokens=120, ignore_eos=True) for i in range(4)]
    streams = asyncio.run(stream_held(server, echo + long))
    tokenizer = demo_tokenizer()
    for messages in streams:
        assert sum(m.finished for m in messages) == 1 and messages[-1].finished
        ids = [t for m in messages for t in m.token_ids]
        text = "".join(m.text for m in messages)
        assert messages[-1].usage.completion_tokens == len(ids)
        # a token lost, repeated or moved would change the text decoded from the ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for (adapter, prompt), messages in zip(ECHO, streams[:len(ECHO)], strict=True):
        assert "".join(m.text for m in messages) == expected_output(adapter, prompt)
    for messages in streams[len(ECHO):]:
        assert len([t for m in messages for t in m.token_ids]) == 120
        assert messages[-1].finish_reason == "length"
    # the hold made the streams fall behind: what piled up came as one message
    assert max(len(m.token_ids) for messages in streams for m in messages) > 1


def test_a_stream_that_keeps_up_gets_tokens_one_message_each(server: RunningServer) -> None:
    """Nothing held: a single stream gets its tokens as they are made, not batched up."""
    async def run() -> list[pb.GenerateResponse]:
        async with AsyncClient(server.target) as client:
            return [m async for m in client.generate_stream(chat_request("one by one", max_tokens=48,
                                                                         ignore_eos=True), timeout=120)]

    messages = asyncio.run(run())
    sizes = [len(m.token_ids) for m in messages]
    assert sum(sizes) == 48
    assert sizes.count(1) >= 24  # most messages carry one token (a busy CI machine may merge a few)
