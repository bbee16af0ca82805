"""A real ``loraplex serve`` process: the CLI as a new user runs it, vanishing clients, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loraplex.backend.demo import expected_output
from loraplex.clients import AsyncClient, Client
from tests.helpers import loraplex_command, metric_value
from tests.server.harness import chat_request, read_rest
from tests.server.served import ServeProcess, start_serve

LOADER = [sys.executable, "-m", "loraplex.backend.cli"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    served = start_serve(tmp_path_factory.mktemp("serve") / "server.log")
    yield served
    served.stop()


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*loraplex_command(), *args], capture_output=True, text=True, timeout=120, input=stdin)


def test_generate_from_the_terminal_as_a_new_user(served: ServeProcess) -> None:
    """The README's quick start, word for word (plus --target for the test's port)."""
    common = ("generate", "--target", served.target, "--chat", "--temperature", "0", "--max-tokens", "32")
    base = cli(*common, "Hello world")
    assert base.returncode == 0, base.stderr
    assert base.stdout == "Hello world\n" and "finish_reason=stop" in base.stderr
    reverse = cli(*common, "--adapter", "reverse", "Hello world")
    assert reverse.returncode == 0 and reverse.stdout == "dlrow olleH\n", reverse.stderr
    upper = cli(*common, "--adapter", "upper", "--stream", "Hello world")
    assert upper.returncode == 0 and upper.stdout == expected_output("upper", "Hello world") + "\n", upper.stderr
    listing = cli("adapters", "list", "--target", served.target)
    assert listing.returncode == 0 and "reverse" in listing.stdout and "upper" in listing.stdout
    missing = cli("generate", "--target", served.target, "--adapter", "nope", "hi")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


VANISHING_CLIENT = """
import sys, threading
from loraplex.clients import Client, pb
client = Client(sys.argv[1])
req = pb.GenerateRequest(prompt="vanish", params=pb.SamplingParameters(max_tokens=200, ignore_eos=True))
streams = [client.generate_stream(req) for _ in range(8)]
for s in streams:
    next(s)
print("streaming", flush=True)
threading.Event().wait()
"""


def test_clients_that_vanish_mid_stream_leave_nothing_behind(served: ServeProcess) -> None:
    rss = []
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, served.target], stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "streaming"
        child.kill()  # no goodbye: the connection just drops
        child.wait(10)
        rss.append(served.rss_kib())
    deadline = time.monotonic() + 20
    with Client(served.target) as client:
        while True:
            client.generate(chat_request("tick", max_tokens=2), timeout=30)  # a step refreshes the gauges
            text = served.scrape()
            if metric_value(text, "loraplex_kv_cache_blocks_used") == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert metric_value(text, "loraplex_kv_cache_blocks_used") == 0
    assert metric_value(text, "loraplex_num_requests_running") == 0
    assert metric_value(text, "loraplex_grpc_streams_in_flight") == 0
    assert metric_value(text, "loraplex_requests_total", 'outcome="cancelled"') >= 24
    assert rss[-1] - rss[0] < 64 * 1024, rss


def test_sigterm_drains_in_flight_streams_then_exits_0(served: ServeProcess) -> None:
    async def run() -> list[list]:
        async with AsyncClient(served.target) as client:
            calls = [client.stub.Generate(chat_request(f"drain {i}", max_tokens=200, ignore_eos=True))
                     for i in range(4)]
            firsts = [await call.read() for call in calls]
            served.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while await client.health() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not await client.health() and not await client.health("")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.generate(chat_request("too late"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert all(not call.done() for call in calls), "streams ended before the drain was checked"
            return [[first, *await read_rest(call)] for first, call in zip(firsts, calls, strict=True)]

    streams = asyncio.run(run())
    for chunks in streams:
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"
        assert sum(len(c.token_ids) for c in chunks) == 200
    assert served.proc.wait(timeout=30) == 0, served.log.read_text()[-3000:]


# 127.0.0.1, ::ffff:127.0.0.1 and ::1 as /proc/net/tcp and tcp6 write them
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* write them) of sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_serve_listens_on_loopback_by_default(tmp_path: Path) -> None:
    """Issue 11.2 as it showed: the gRPC server and its metrics listened on 0.0.0.0 by default."""
    served = start_serve(tmp_path / "server.log", "--device", "cpu", "--port", "0", "--metrics-port", "0",
                         "--max-model-len", "256", base=())
    try:
        ports = [int(served.target.rsplit(":", 1)[1]), int(served.metrics_url.rsplit(":", 1)[1].split("/")[0])]
        assert served.target.startswith("127.0.0.1:") and served.metrics_url.startswith("http://127.0.0.1:")
        for port in ports:
            assert listening_addresses(port) and listening_addresses(port) <= LOOPBACK, port
        with Client(served.target) as client:
            assert client.health()
    finally:
        served.stop()


def test_module_entry_point_help() -> None:
    out = subprocess.run([*LOADER, "serve", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LORAPLEX_API_KEY": ""})
    assert out.returncode == 0 and "--grace-period" in out.stdout and "--lora NAME=SOURCE" in out.stdout
