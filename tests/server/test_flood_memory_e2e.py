"""RELIABILITY 2 and 13: repeated floods, with the admitted streams read to their end, cancelled by
their client mid-stream, or dropped by a client process that exits mid-stream, leave a real
``loraplex serve`` flat: KV blocks all free again, nothing in flight, and the resident memory of the
server and of its engine core bounded once warmed up.

Each round is a flood of 400 calls at B = 8 from a client process of its own; after 3 warm-up rounds,
12 more (4,800 calls). Measured: server 273-287 MiB, engine core 354 MiB in every round (once, in CI, the
core grew 46 MiB in the first measured round, stayed flat, and fell back by 45 MiB in the last three).
Checked: growth under 32 MiB from the end of the first measured round, and no new peak 16 MiB above the
first half's in the second half."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.clients import Client
from tests.helpers import metric_value
from tests.server.harness import chat_request
from tests.server.served import ServeProcess, start_serve

MAX_RUNNING, MAX_WAITING, CALLS = 4, 8, 400
MODES = ("end", "cancel", "vanish")
WARM_ROUNDS, ROUNDS = 3, 12
CLIENT = Path(__file__).with_name("flood_client.py")
MIB = 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    served = start_serve(tmp_path_factory.mktemp("flood-memory") / "server.log", "--max-num-seqs",
                         str(MAX_RUNNING), "--max-waiting-requests", str(MAX_WAITING), "--max-model-len", "1024",
                         "--max-num-batched-tokens", "1024")
    yield served
    served.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def core_pid(server_pid: int) -> int:
    """The engine core: the server's child process with the largest memory."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == server_pid:
            children.append(int(stat.parent.name))
    assert children, "the server has no engine core process"
    return max(children, key=rss_kib)


def flood(served: ServeProcess, mode: str) -> list[list]:
    out = subprocess.run([sys.executable, str(CLIENT), served.target, str(CALLS), "1", "128", mode],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[0])


TICK_ENDS: collections.Counter[str] = collections.Counter()  # how settle's own requests ended


def settle(served: ServeProcess) -> str:
    """The /metrics text once nothing runs, waits or streams (a tiny request makes the engine step,
    which refreshes its gauges); fails after 30 s."""
    deadline = time.monotonic() + 30
    with Client(served.target) as client:
        while True:
            TICK_ENDS[client.generate(chat_request("tick", max_tokens=2), timeout=30).finish_reason] += 1
            text = served.scrape()
            idle = all(metric_value(text, name) == 0 for name in (
                "loraplex_kv_cache_blocks_used", "loraplex_num_requests_running", "loraplex_num_requests_waiting",
                "loraplex_grpc_streams_in_flight"))
            if idle or time.monotonic() > deadline:
                return text
            time.sleep(0.2)


@pytest.mark.slow
def test_repeated_floods_and_vanishing_clients_leave_memory_and_kv_flat(served: ServeProcess) -> None:
    core = core_pid(served.proc.pid)
    for i in range(WARM_ROUNDS):
        flood(served, MODES[i % len(MODES)])
    text = settle(served)
    blocks = metric_value(text, "loraplex_kv_cache_blocks")
    assert blocks > 0
    rss = [(rss_kib(served.proc.pid), rss_kib(core))]
    for i in range(ROUNDS):
        mode = MODES[i % len(MODES)]
        before = metric_value(text, "loraplex_requests_total", 'outcome="cancelled"')
        before_length = metric_value(text, "loraplex_requests_total", 'outcome="length"') - TICK_ENDS["length"]
        results = flood(served, mode)
        admitted = [r for r in results if r[0] != "RESOURCE_EXHAUSTED"]
        # a cancelled stream frees its place at once, so a cancelling client gets more in
        capacity = MAX_WAITING + MAX_RUNNING
        assert len(admitted) == capacity if mode != "cancel" else len(admitted) >= capacity, (mode, len(admitted))
        text = settle(served)
        for name in ("loraplex_kv_cache_blocks_used", "loraplex_num_requests_running",
                     "loraplex_num_requests_waiting", "loraplex_grpc_streams_in_flight"):
            assert metric_value(text, name) == 0, (mode, name)
        assert metric_value(text, "loraplex_kv_cache_blocks") == blocks  # every block free again
        cancelled = metric_value(text, "loraplex_requests_total", 'outcome="cancelled"') - before
        if mode == "cancel":  # the server saw each admitted stream end early when its client cancelled
            assert cancelled == len(admitted), (mode, cancelled)
        elif mode == "vanish":
            # every admitted stream ended exactly once: cancelled when the server saw the connection
            # drop, or run to its length if it was already finishing when its client exited (a
            # running stream's last tokens can beat the disconnect on a quiet machine); none that
            # was still waiting ran
            ended_by_length = metric_value(text, "loraplex_requests_total", 'outcome="length"') - TICK_ENDS["length"]
            ran_out = ended_by_length - before_length - 1  # the flood client's warm-up call runs to its length
            waiting = sum(r[0] == "WAITING" for r in results)
            assert cancelled + ran_out == len(admitted) and cancelled >= waiting, (mode, cancelled, ran_out, waiting)
        rss.append((rss_kib(served.proc.pid), rss_kib(core)))
    print("RSS MiB (server, core) per round:", [(s // MIB, c // MIB) for s, c in rss])
    half = len(rss) // 2
    for who, series in (("server", [s for s, _ in rss]), ("core", [c for _, c in rss])):
        # bounded growth after warm-up, measured from the end of the first measured round (see the docstring)
        assert max(series[1:]) - series[1] < 32 * MIB, (who, series)
        assert max(series[half:]) - max(series[:half + 1]) < 16 * MIB, (who, series)  # and no trend
