"""The engine-client protocol over a real gRPC server: abort from a control connection, tokenize and
detokenize as Generate does, the load report, the prefix-cache reset, and the character bound."""

from __future__ import annotations

import time

import grpc
import pytest

from loraplex.backend.engine.protocol import ABORTED_BY_REQUEST, EngineClient
from loraplex.clients import Client, pb
from tests.server.harness import RunningServer, chat_request


def test_the_in_process_client_implements_the_protocol(demo: RunningServer) -> None:
    assert isinstance(demo.engine, EngineClient)  # mypy checks both clients (server.app.engine_client)


def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_abort_ends_another_connections_stream_and_frees_its_kv(demo: RunningServer) -> None:
    with Client(demo.target) as client:
        stream = client.generate_stream(chat_request("abort me", max_tokens=200, ignore_eos=True,
                                                     request_id="to-abort"), timeout=60)
        first = next(stream)
        assert not first.finished
        load = demo.engine.get_load()
        assert load.running + load.waiting >= 1 and load.kv_blocks_used > 0 and 0 < load.kv_usage <= 1
        assert demo.loop.run(demo.engine.abort("to-abort")) is True
        rest = list(stream)
    final = rest[-1]
    assert final.finished and final.finish_reason == "abort" and final.error == ABORTED_BY_REQUEST
    wait_for(lambda: demo.engine.engine.kv.num_used_blocks == 0)
    assert demo.loop.run(demo.engine.abort("to-abort")) is False  # no longer in flight
    wait_for(lambda: demo.engine.get_load().running == 0)


def test_tokenize_applies_the_chat_template_as_generate_does(demo: RunningServer) -> None:
    messages = [{"role": "user", "content": "count my tokens"}]
    ids = demo.loop.run(demo.engine.tokenize(None, messages=messages))
    with Client(demo.target) as client:
        result = client.generate(chat_request("count my tokens", max_tokens=1))
    assert len(ids) == result.usage.prompt_tokens
    text = demo.loop.run(demo.engine.detokenize(ids, skip_special_tokens=False))
    assert "count my tokens" in text
    plain = demo.loop.run(demo.engine.tokenize("hello"))
    assert demo.loop.run(demo.engine.detokenize(plain)) == "hello"


def test_reset_prefix_cache_and_load_report(demo: RunningServer) -> None:
    with Client(demo.target) as client:
        client.generate(chat_request("cache this prefix please", adapter="upper", max_tokens=2))
    assert demo.engine.engine.kv.cached
    assert demo.loop.run(demo.engine.reset_prefix_cache()) is True
    assert not demo.engine.engine.kv.cached  # nothing held: every cached block forgotten
    load = demo.engine.get_load()
    assert load.kv_blocks_total > 0 and load.max_loras == demo.engine.config.lora.max_loras
    assert "upper" in load.resident_adapters and not load.loading_adapters


def test_a_huge_prompt_fails_in_milliseconds(demo: RunningServer) -> None:
    huge = "x" * 3_900_000
    with Client(demo.target) as client:
        for request in (pb.GenerateRequest(prompt=huge), chat_request(huge)):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                client.generate(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cannot fit in max_model_len" in err.value.details()
            assert time.monotonic() - start < 1.0  # transfer of 3.9 MB included; tokenizing it took seconds
