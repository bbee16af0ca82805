"""The client package (its import rules: tests/test_architecture.py): stale-stub check, and the clients against a stub server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loraplex.clients import AsyncClient, Client, codegen, pb, pb_grpc


def test_codegen_check_passes_on_checked_in_stubs() -> None:
    proc = subprocess.run([sys.executable, "-m", "loraplex.clients.codegen", "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_codegen_detects_stale(tmp_path) -> None:
    generated = codegen.generate(codegen.repo_root() / "protos")
    for name, content in generated.items():
        (tmp_path / name).write_bytes(content)
    assert codegen.stale_files(tmp_path, generated) == []
    (tmp_path / "inference_pb2.py").write_bytes(generated["inference_pb2.py"] + b"\n")
    assert codegen.stale_files(tmp_path, generated) == ["inference_pb2.py"]
    assert b"from loraplex.clients.v1 import inference_pb2" in generated["inference_pb2_grpc.py"]


class EchoService(pb_grpc.InferenceServiceServicer):
    """Streams the prompt back one character per message; records call metadata."""

    def __init__(self) -> None:
        self.seen_metadata: list[dict[str, str]] = []
        self.cancelled = threading.Event()

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        self.seen_metadata.append(dict(context.invocation_metadata()))
        if request.adapter == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "adapter 'missing' is not registered")
        try:
            for i, ch in enumerate(request.prompt):
                yield pb.GenerateResponse(request_id="r1", text=ch, token_ids=[i])
                await asyncio.sleep(0.005)
            yield pb.GenerateResponse(request_id="r1", finished=True, finish_reason="length",
                                      usage=pb.Usage(prompt_tokens=1, completion_tokens=len(request.prompt)))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def ListAdapters(self, request, context) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(adapters=[pb.AdapterInfo(name="a", version=1)])

    async def LoadAdapter(self, request, context) -> pb.LoadAdapterResponse:
        return pb.LoadAdapterResponse(adapter=pb.AdapterInfo(name=request.name, source=request.source))


class LoopThread:
    """An event loop on its own thread, so sync and async clients can both call servers on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _start_echo(service: EchoService) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("loraplex.v1.InferenceService", health_pb2.HealthCheckResponse.SERVING)
    return server, port


@pytest.fixture
def echo_server() -> Iterator[tuple[str, EchoService]]:
    lt = LoopThread()
    service = EchoService()
    server, port = lt.run(_start_echo(service))
    yield f"127.0.0.1:{port}", service
    lt.run(server.stop(None))
    lt.stop()


def test_async_client_roundtrip(echo_server) -> None:
    target, service = echo_server

    async def scenario() -> None:
        async with AsyncClient(target, token="sekret") as client:
            result = await client.generate(pb.GenerateRequest(prompt="abc"))
            assert (result.text, result.token_ids, result.finish_reason) == ("abc", [0, 1, 2], "length")
            assert result.usage.completion_tokens == 3 and result.request_id == "r1"
            assert [a.name for a in await client.list_adapters()] == ["a"]
            info = await client.load_adapter("x", "/src")
            assert (info.name, info.source) == ("x", "/src")
            assert await client.health()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.generate(pb.GenerateRequest(prompt="a", adapter="missing"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            async for _ in client.generate_stream(pb.GenerateRequest(prompt="x" * 1000)):
                break
            for _ in range(500):
                if service.cancelled.is_set():
                    break
                await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert service.seen_metadata[0]["authorization"] == "Bearer sekret"
    assert service.cancelled.is_set()


def test_sync_client_roundtrip(echo_server) -> None:
    target, service = echo_server
    with Client(target) as client:
        result = client.generate(pb.GenerateRequest(prompt="hey"), timeout=10)
        assert result.text == "hey" and result.finish_reason == "length"
        assert client.health()
        assert [a.name for a in client.list_adapters()] == ["a"]
        with pytest.raises(grpc.RpcError) as err:
            client.generate(pb.GenerateRequest(prompt="a", adapter="missing"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "authorization" not in service.seen_metadata[0]
