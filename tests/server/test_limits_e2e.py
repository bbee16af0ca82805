"""A server with a tiny queue: floods are refused fast; then its engine loop dies and health follows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.backend.demo import expected_output
from loraplex.clients import AsyncClient, Client
from tests.server.harness import RunningServer, chat_request, start_server, stop_server

MAX_RUNNING, MAX_WAITING = 2, 4


@pytest.fixture(scope="module")
def small() -> Iterator[RunningServer]:
    rs = start_server({"max_num_seqs": MAX_RUNNING, "max_waiting_requests": MAX_WAITING})
    yield rs
    stop_server(rs)


def test_flood_past_the_queue_is_refused_fast_and_admitted_finish(small: RunningServer) -> None:
    n = 5 * (MAX_RUNNING + MAX_WAITING)

    async def one(client: AsyncClient, i: int) -> tuple[str, float, str]:
        start = time.monotonic()
        try:
            request = chat_request(f"flood {i}", max_tokens=48, ignore_eos=True)
            result = await client.generate(request, timeout=120)
            return "ok", time.monotonic() - start, result.text
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            return "refused", time.monotonic() - start, ""

    async def run() -> list[tuple[str, float, str]]:
        async with AsyncClient(small.target) as client:
            return await asyncio.gather(*[one(client, i) for i in range(n)])

    results = asyncio.run(run())
    admitted = [(i, r) for i, r in enumerate(results) if r[0] == "ok"]
    refused = [r for r in results if r[0] == "refused"]
    assert len(refused) >= n // 2 and len(admitted) >= MAX_RUNNING + MAX_WAITING
    assert max(r[1] for r in refused) < 2.0
    for i, (_, _, text) in admitted:  # ignore_eos: the demo answer, then whatever follows its EOS
        assert text.startswith(expected_output("", f"flood {i}"))
    assert small.engine.num_unfinished() == 0


def test_health_flips_when_the_engine_loop_dies(small: RunningServer) -> None:
    with Client(small.target) as client:
        assert client.health() and client.health("")
        small.engine._inject_step_fault(RuntimeError("injected fatal fault"))
        try:  # the fault fires at the next step: give the loop one
            result = client.generate(chat_request("boom"), timeout=30)
            assert result.finish_reason == "abort"
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 5
        while client.health() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not client.health() and not client.health("")
        with grpc.insecure_channel(small.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        with pytest.raises(grpc.RpcError) as err:
            client.generate(chat_request("after death"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
