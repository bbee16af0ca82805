"""The control RPCs (Tokenize, Detokenize, Abort, GetLoad, ResetPrefixCache) over a real server:
through the generated stubs, through a client that knows only reflection v1, with and without auth."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from loraplex.backend.server.config import ServerConfig
from loraplex.backend.server.health import SERVICE_NAME
from loraplex.clients import AsyncClient, Client, pb
from tests.server.harness import RunningServer, chat_request, demo_tokenizer, read_rest
from tests.server.reflect import ReflectionClient

TOKEN = "control-token"
CONTROL_RPCS = ("Tokenize", "Detokenize", "Abort", "GetLoad", "ResetPrefixCache")


async def wait_load(client: AsyncClient, ok: object, timeout: float = 30.0) -> pb.GetLoadResponse:
    for _ in range(int(timeout / 0.02)):
        load = await client.get_load(timeout=10)
        if ok(load):  # type: ignore[operator]
            return load
        await asyncio.sleep(0.02)
    raise AssertionError(f"load never matched: {load}")


def test_tokenize_matches_generate_and_detokenize_round_trips(demo: RunningServer) -> None:
    tokenizer = demo_tokenizer()
    with Client(demo.target) as client:
        ids = client.tokenize("hello world", timeout=10)
        assert ids == list(tokenizer.encode("hello world", add_special_tokens=True))
        chat = chat_request("abc def").chat
        chat_ids = client.tokenize(chat=chat, timeout=10)
        result = client.generate(chat_request("abc def", max_tokens=2), timeout=30)
        assert len(chat_ids) == result.usage.prompt_tokens  # the same template, the same tokens
        assert client.detokenize(ids, timeout=10) == tokenizer.decode(ids, skip_special_tokens=True)
        for call, needle in ((lambda: client.tokenize("", timeout=10), "prompt"),
                             (lambda: client.stub.Tokenize(pb.TokenizeRequest(), timeout=10), "input"),
                             (lambda: client.detokenize([10**6], timeout=10), "token_ids"),
                             (lambda: client.abort("", timeout=10), "request_id")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
        assert client.abort("never-ran", timeout=10) is False
        assert client.reset_prefix_cache(timeout=10) is True


def test_abort_from_another_connection_ends_the_stream_and_frees_kv(demo: RunningServer) -> None:
    async def run() -> None:
        async with AsyncClient(demo.target) as streamer, AsyncClient(demo.target) as control:
            idle = await wait_load(control, lambda lo: lo.running == 0 and lo.kv_blocks_used == 0)
            assert idle.kv_blocks_total > 0 and idle.max_loras >= 1 and idle.kv_usage == 0
            call = streamer.stub.Generate(chat_request("abort me please", "reverse", request_id="ctl-abort-1",
                                                       max_tokens=200, ignore_eos=True))
            first = await call.read()
            assert not first.finished
            busy = await control.get_load(timeout=10)
            assert busy.running + busy.waiting >= 1 and busy.kv_blocks_used > 0 and busy.kv_usage > 0
            # adapter gauges refresh at most every 0.25 s while the engine runs (per-step snapshot)
            await wait_load(control, lambda lo: "reverse" in lo.resident_adapters)
            assert await control.abort("ctl-abort-1", timeout=10) is True
            rest = await read_rest(call)
            final = rest[-1]
            assert final.finished and final.finish_reason == "abort" and "Abort" in final.error
            assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) < 200
            await wait_load(control, lambda lo: lo.running == 0 and lo.kv_blocks_used == 0)
            assert await control.abort("ctl-abort-1", timeout=10) is False

    asyncio.run(run())


def test_reset_prefix_cache_keeps_blocks_in_use(demo: RunningServer) -> None:
    kv = demo.engine.engine.kv

    async def run() -> None:
        async with AsyncClient(demo.target) as client:
            await client.generate(chat_request("a prefix that fills more than one block " * 3, max_tokens=2))
            assert kv.cached  # the finished request left cached blocks
            call = client.stub.Generate(chat_request("another long prefix to keep running " * 3,
                                                     request_id="ctl-reset-1", max_tokens=100, ignore_eos=True))
            await call.read()
            assert await client.reset_prefix_cache() is False  # the running request's blocks stay
            assert all(kv.blocks[b].ref_count > 0 for b in kv.cached.values())
            call.cancel()
            await wait_load(client, lambda lo: lo.running == 0 and lo.kv_blocks_used == 0)
            assert await client.reset_prefix_cache() is True and not kv.cached

    asyncio.run(run())


@pytest.fixture(scope="module")
def auth_target(demo: RunningServer) -> str:
    return demo.add_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=None, api_key=TOKEN))


def control_calls(client: Client) -> dict[str, object]:
    return {"Tokenize": lambda: client.tokenize("hi", timeout=10),
            "Detokenize": lambda: client.detokenize([5, 6], timeout=10),
            "Abort": lambda: client.abort("nothing", timeout=10),
            "GetLoad": lambda: client.get_load(timeout=10),
            "ResetPrefixCache": lambda: client.reset_prefix_cache(timeout=10)}


@pytest.mark.parametrize("token", [None, "wrong"])
def test_control_rpcs_need_the_token(auth_target: str, token: str | None) -> None:
    with Client(auth_target, token=token) as client:
        for name, call in control_calls(client).items():
            with pytest.raises(grpc.RpcError) as err:
                call()  # type: ignore[operator]
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        with pytest.raises(grpc.RpcError) as err:
            ReflectionClient(client.channel, [("authorization", f"Bearer {token}")] if token else None).services()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_control_rpcs_with_the_token(auth_target: str) -> None:
    with Client(auth_target, token=TOKEN) as client:
        for name, call in control_calls(client).items():
            assert call() is not None, name  # type: ignore[operator]


@pytest.mark.parametrize("auth", [False, True])
def test_reflection_v1_lists_describes_and_calls(demo: RunningServer, auth_target: str, auth: bool) -> None:
    target, metadata = (auth_target, [("authorization", f"Bearer {TOKEN}")]) if auth else (demo.target, None)
    with grpc.insecure_channel(target) as channel:
        client = ReflectionClient(channel, metadata)
        services = client.services()
        assert {SERVICE_NAME, "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
                "grpc.health.v1.Health"} <= set(services)
        service = client.describe(SERVICE_NAME)
        assert set(CONTROL_RPCS) | {"Generate", "LoadAdapter"} <= set(service.methods_by_name)
        assert "ServerReflectionInfo" in client.describe("grpc.reflection.v1.ServerReflection").methods_by_name
        ids = client.unary(SERVICE_NAME, "Tokenize", prompt="hello").token_ids
        assert list(ids) == list(demo_tokenizer().encode("hello"))
        assert client.unary(SERVICE_NAME, "Detokenize", token_ids=list(ids)).text == "hello"
        assert client.unary(SERVICE_NAME, "Abort", request_id="nobody").aborted is False
        assert client.unary(SERVICE_NAME, "GetLoad").kv_blocks_total > 0
        client.unary(SERVICE_NAME, "ResetPrefixCache")


def test_malformed_bytes_to_health_and_reflection_log_once(demo: RunningServer,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    garbage = b"\xff\xff\xff\xff\x0f"
    methods = ["/grpc.health.v1.Health/Check", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
               "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"]
    caplog.set_level(logging.DEBUG)
    with grpc.insecure_channel(demo.target) as channel:
        for _ in range(30):
            for method in methods:
                with pytest.raises(grpc.RpcError) as err:
                    if "Health" in method:
                        channel.unary_unary(method)(garbage, timeout=10)
                    else:
                        list(channel.stream_stream(method)(iter([garbage]), timeout=10))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
    malformed = [r for r in caplog.records if "malformed" in r.getMessage().lower()
                 or "deserializ" in r.getMessage().lower()]
    assert all(r.exc_info is None for r in malformed)
    assert len(malformed) <= 2, [r.getMessage() for r in malformed]  # one per kind (health, reflection)
