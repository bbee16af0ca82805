"""End to end over gRPC: the real engine with the demo model, the generated stubs, a free loopback port."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from loraplex.backend.demo import DEMO_ADAPTERS, expected_output, sample_inputs
from loraplex.clients import AsyncClient, Client, pb
from tests.helpers import metric_value
from tests.server.harness import RunningServer, chat_request, read_rest

BASE_TASKS = ["", "reverse", "upper"]  # adapters the engine registers with the demo model


def kv_used(rs: RunningServer) -> int:
    return rs.engine.engine.kv.num_used_blocks


async def wait_idle(rs: RunningServer, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if rs.engine.num_unfinished() == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{rs.engine.num_unfinished()} requests still unfinished")


async def collect(client: AsyncClient, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return [chunk async for chunk in client.generate_stream(request, timeout=60)]


def check_stream(chunks: list[pb.GenerateResponse], task: str, text: str) -> None:
    """Exactly one final message, last; text and tokens add up; the demo transformation is right."""
    assert [c.finished for c in chunks].count(True) == 1 and chunks[-1].finished
    final = chunks[-1]
    got = "".join(c.text for c in chunks)
    assert got == expected_output(task, text), (task, text, got)
    assert final.finish_reason == "stop"
    tokens = [t for c in chunks for t in c.token_ids]
    assert final.usage.completion_tokens == len(tokens) and final.usage.prompt_tokens > 0
    assert final.timings.e2e_latency >= final.timings.time_to_first_token > 0
    assert len({c.request_id for c in chunks}) == 1


def test_one_stream_per_demo_adapter(demo: RunningServer) -> None:
    async def run() -> None:
        async with AsyncClient(demo.target) as client:
            for task in BASE_TASKS:
                check_stream(await collect(client, chat_request("Hello World", task)), task, "Hello World")

    asyncio.run(run())


def test_64_mixed_streams_while_adapters_load_and_unload(demo: RunningServer) -> None:
    """64 concurrent streams over base + 4 adapters (one loaded for the test) while others churn."""
    texts = sample_inputs(64, seed=7, max_len=10)
    tasks = [["", "reverse", "upper", "upper-copy"][i % 4] for i in range(64)]

    async def churn(client: AsyncClient, stop: asyncio.Event) -> int:
        n = 0
        while not stop.is_set():
            name = f"churn-{n % 3}"
            await client.load_adapter(name, str(DEMO_ADAPTERS["reverse"]), replace=True)
            await client.unload_adapter(name)
            n += 1
        return n

    async def run() -> None:
        async with AsyncClient(demo.target) as client:
            await client.load_adapter("upper-copy", str(DEMO_ADAPTERS["upper"]), replace=True)
            stop = asyncio.Event()
            churner = asyncio.create_task(churn(client, stop))
            results = await asyncio.gather(*[collect(client, chat_request(t, a)) for t, a in zip(texts, tasks, strict=True)])
            stop.set()
            assert await churner > 0
            await client.unload_adapter("upper-copy")
            for chunks, text, adapter in zip(results, texts, tasks, strict=True):
                check_stream(chunks, adapter.removesuffix("-copy"), text)
            names = {a.name for a in await client.list_adapters()}
            assert not any(n.startswith("churn-") or n == "upper-copy" for n in names)

    asyncio.run(run())


def steps(rs: RunningServer) -> int:
    return rs.engine.engine.stats.num_steps


async def steps_until_gone(rs: RunningServer, request_ids: set[str]) -> int:
    """Engine steps run until none of ``request_ids`` is held by the engine any more."""
    before = steps(rs)
    while request_ids & set(rs.engine.engine.seqs):
        await asyncio.sleep(0.001)
    return steps(rs) - before


def test_cancel_half_of_32_streams_frees_kv(demo: RunningServer) -> None:
    """Over base + adapters: 8 cancelled by the client (gone within a step), 8 by a deadline,
    16 finish; KV blocks and adapter pins return to where they started."""
    start = kv_used(demo)
    adapters = ["", "reverse", "upper", "think"]
    long = [chat_request(f"stream {i}", adapters[i % 4], max_tokens=200, ignore_eos=True, request_id=f"c{i}")
            for i in range(32)]

    async def run() -> None:
        async with AsyncClient(demo.target) as client:
            calls = [client.stub.Generate(r) for r in long[8:]]
            for call in calls:
                first = await call.read()
                assert first != grpc.aio.EOF and not first.finished
            assert kv_used(demo) > start
            assert sum(a.running_requests for a in demo.loop.run(demo.engine.list_adapters())) == 18
            expiring = [client.stub.Generate(r, timeout=0.5) for r in long[:8]]
            for call in calls[:8]:
                call.cancel()
            assert await steps_until_gone(demo, {r.request_id for r in long[8:16]}) <= 2
            for call in expiring:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await read_rest(call)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            finished = [(await read_rest(call))[-1] for call in calls[8:]]
            assert [f.finish_reason for f in finished] == ["length"] * 16
            await wait_idle(demo)

    asyncio.run(run())
    assert kv_used(demo) == start
    assert all(a.running_requests == 0 for a in demo.loop.run(demo.engine.list_adapters()))


def bad_request_table() -> list[tuple[pb.GenerateRequest, grpc.StatusCode, str]]:
    ok = chat_request("hi")
    too_long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[65] * 250), params=pb.SamplingParameters(max_tokens=10))
    return [
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
        (chat_request("hi", adapter="no-such-adapter"), grpc.StatusCode.NOT_FOUND, "no-such-adapter"),
        (chat_request("hi", temperature=2.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (chat_request("hi", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (chat_request("hi", logprobs=21), grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
        (chat_request("hi", stop=["x"] * 17), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
        (chat_request("hi", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (too_long, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**6])), grpc.StatusCode.INVALID_ARGUMENT, "token"),
        (pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="robot", content="x")])),
         grpc.StatusCode.INVALID_ARGUMENT, "role"),
        (pb.GenerateRequest(chat=ok.chat, params=ok.params, request_id="has space"),
         grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    ]


def bad_adapter_table(tmp_path) -> list[tuple[dict, grpc.StatusCode]]:
    import shutil

    broken_json = tmp_path / "broken-json"
    shutil.copytree(DEMO_ADAPTERS["upper"], broken_json)
    (broken_json / "adapter_config.json").write_text("{not json")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(DEMO_ADAPTERS["upper"], no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    return [
        ({"name": "upper", "source": str(DEMO_ADAPTERS["upper"])}, grpc.StatusCode.ALREADY_EXISTS),
        ({"name": "", "source": str(DEMO_ADAPTERS["upper"])}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"name": "x", "source": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"name": "x", "source": str(tmp_path / "missing")}, grpc.StatusCode.PERMISSION_DENIED),  # as outside
        ({"name": "x", "source": str(broken_json)}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"name": "x", "source": str(no_weights)}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"name": "x", "source": "/tmp/%2e%2e/etc"}, grpc.StatusCode.PERMISSION_DENIED),
    ]


def test_bad_requests_and_adapters_get_the_right_codes(demo: RunningServer, tmp_path) -> None:
    with Client(demo.target) as client:
        for request, code, needle in bad_request_table():
            with pytest.raises(grpc.RpcError) as err:
                client.generate(request, timeout=30)
            assert err.value.code() == code, (request, err.value.details())
            assert needle in err.value.details(), err.value.details()
        for kwargs, code in bad_adapter_table(tmp_path):
            with pytest.raises(grpc.RpcError) as err:
                client.load_adapter(**kwargs, timeout=30)
            assert err.value.code() == code, (kwargs, err.value.details())
        with pytest.raises(grpc.RpcError) as err:
            client.unload_adapter("no-such-adapter", timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "x" not in {a.name for a in client.list_adapters()}
        result = client.generate(chat_request("still fine", "reverse"), timeout=30)
        assert result.text == expected_output("reverse", "still fine")


def test_duplicate_running_request_id(demo: RunningServer) -> None:
    async def run() -> None:
        async with AsyncClient(demo.target) as client:
            call = client.stub.Generate(chat_request("dup", request_id="dup-1", max_tokens=100, ignore_eos=True))
            await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.generate(chat_request("dup", request_id="dup-1"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dup-1" in err.value.details()
            call.cancel()
            await wait_idle(demo)
            result = await client.generate(chat_request("dup", request_id="dup-1"))
            assert result.request_id == "dup-1" and result.finish_reason == "stop"

    asyncio.run(run())


def test_logprobs_stop_strings_and_token_ids(demo: RunningServer) -> None:
    with Client(demo.target) as client:
        result = client.generate(chat_request("abcdef", logprobs=2), timeout=30)
        assert len(result.logprobs) == len(result.token_ids) and all(len(lp.top) == 2 for lp in result.logprobs)
        assert all(lp.rank >= 1 and lp.logprob <= 0 for lp in result.logprobs)
        stopped = client.generate(chat_request("abcdef", stop=["cd"]), timeout=30)
        assert (stopped.text, stopped.finish_reason, stopped.stop_string) == ("ab", "stop", "cd")
        ids = list(demo.engine.input_processor.tokenizer.encode("hello"))
        raw = client.generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), params=pb.SamplingParameters(
            max_tokens=3, temperature=0.0, ignore_eos=True)), timeout=30)
        assert raw.finish_reason == "length" and len(raw.token_ids) == 3 and raw.usage.prompt_tokens == len(ids)


def test_server_info_list_adapters_and_health(demo: RunningServer) -> None:
    with Client(demo.target) as client:
        info = client.server_info(timeout=10)
        assert info.model == demo.engine.model_name and info.limits.max_model_len == 256
        assert info.limits.max_stop_strings == 16 and info.limits.max_logprobs == 20
        assert {"lora", "chat_template", "reflection"} <= set(info.features)
        assert info.eos_token_id > 0 and info.device == "cpu"
        adapters = {a.name: a for a in client.list_adapters(timeout=10)}
        assert {"reverse", "upper"} <= set(adapters) and adapters["reverse"].rank > 0
        assert adapters["reverse"].state != pb.ADAPTER_STATE_UNSPECIFIED and adapters["reverse"].version >= 1
        assert client.health() and client.health("")


def test_many_random_requests_mixed(demo: RunningServer) -> None:
    """A quick random mix of good and bad calls; the good ones stay right."""
    rng = random.Random(3)
    texts = sample_inputs(24, seed=11, max_len=8)

    async def one(client: AsyncClient, text: str) -> None:
        if rng.random() < 0.3:
            with pytest.raises(grpc.aio.AioRpcError):
                await client.generate(chat_request(text, adapter="ghost"))
            return
        task = rng.choice(BASE_TASKS)
        check_stream(await collect(client, chat_request(text, task)), task, text)

    async def run() -> None:
        async with AsyncClient(demo.target) as client:
            await asyncio.gather(*[one(client, t) for t in texts])

    asyncio.run(run())


def test_metrics_move(demo: RunningServer) -> None:
    before = demo.scrape()
    with Client(demo.target) as client:
        client.generate(chat_request("metrics", "upper"), timeout=30)
        client.generate(chat_request("metrics"), timeout=30)
    after = demo.scrape()
    for name, labels in [("loraplex_requests_total", 'outcome="stop"'),
                         ("loraplex_generation_tokens_total", ""), ("loraplex_prompt_tokens_total", ""),
                         ("loraplex_time_to_first_token_seconds_count", ""),
                         ("loraplex_e2e_request_latency_seconds_count", ""),
                         ("loraplex_request_queue_time_seconds_count", ""),
                         ("loraplex_lora_requests_total", 'adapter="upper"'),
                         ("loraplex_lora_generation_tokens_total", 'adapter="upper"'),
                         ("loraplex_engine_steps_total", "")]:
        assert metric_value(after, name, labels) > metric_value(before, name, labels), name
    assert metric_value(after, "loraplex_kv_cache_blocks") > 0
    assert metric_value(after, "loraplex_engine_loop_alive") == 1
    assert metric_value(after, "loraplex_lora_adapters", 'state="registered"') > 0
    assert "loraplex_prefix_cache_queries_total" in after and "loraplex_num_preemptions_total" in after
