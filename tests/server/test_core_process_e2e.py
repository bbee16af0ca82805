"""The engine core in a process of its own behind a real gRPC server: the same answers, adapter
operations and stats cross the process boundary; when the core dies, streams end with a clear
error and health turns NOT_SERVING (never a hang)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from loraplex.backend.demo import DEMO_ADAPTERS, expected_output
from loraplex.backend.engine.protocol import ABORTED_BY_REQUEST
from loraplex.clients import Client
from tests.helpers import metric_value
from tests.server.harness import RunningServer, chat_request, start_server, stop_server


@pytest.fixture(scope="module")
def split() -> Iterator[RunningServer]:
    rs = start_server(engine_process=True)
    yield rs
    stop_server(rs)


def test_generate_and_adapters_across_the_process_boundary(split: RunningServer) -> None:
    assert split.engine.pid not in (None, os.getpid())
    with Client(split.target) as client:
        for adapter in ("", "upper", "reverse"):
            result = client.generate(chat_request("Hello core", adapter=adapter), timeout=60)
            assert result.text == expected_output(adapter, "Hello core")
        info = client.load_adapter("upper2", str(DEMO_ADAPTERS["upper"]), timeout=60)
        assert info.name == "upper2" and info.version >= 1
        assert client.generate(chat_request("abc", adapter="upper2"), timeout=60).text == expected_output("upper", "abc")
        client.unload_adapter("upper2", timeout=30)
        assert "upper2" not in {a.name for a in client.list_adapters()}
        with pytest.raises(grpc.RpcError) as err:
            client.generate(chat_request("abc", adapter="nope"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
        assert client.server_info().model == split.engine.model_name
    scrape = split.scrape()
    assert metric_value(scrape, "loraplex_engine_steps_total") > 0
    assert split.engine.stats().num_steps > 0 and split.engine.stats().loop_alive


def test_abort_and_cancel_across_the_process_boundary(split: RunningServer) -> None:
    with Client(split.target) as client:
        stream = client.generate_stream(chat_request("long", max_tokens=200, ignore_eos=True, request_id="mp-abort"),
                                        timeout=60)
        next(stream)
        assert split.loop.run(split.engine.abort("mp-abort")) is True
        final = list(stream)[-1]
        assert final.finish_reason == "abort" and final.error == ABORTED_BY_REQUEST
    deadline = time.monotonic() + 10
    while split.engine.stats().kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert split.engine.stats().kv_blocks_used == 0 and split.engine.num_unfinished() == 0


def test_core_death_fails_streams_and_health(split: RunningServer) -> None:
    with Client(split.target) as client:
        assert client.health()
        stream = client.generate_stream(chat_request("die", max_tokens=200, ignore_eos=True), timeout=60)
        next(stream)
        os.kill(split.engine.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "engine core" in err.value.details()
        assert time.monotonic() - start < 5
        deadline = time.monotonic() + 5
        while client.health() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not client.health() and not client.health("")
        with pytest.raises(grpc.RpcError) as err:
            client.generate(chat_request("after death"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
