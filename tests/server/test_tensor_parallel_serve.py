"""A real ``loraplex serve --tensor-parallel-size 2`` on CPU (gloo): the demo model's adapters
answer right in one mixed batch across two worker processes; killing a worker ends the open
stream with an error naming it and turns health NOT_SERVING, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from loraplex.backend.demo import expected_output
from loraplex.clients import Client
from tests.helpers import loraplex_command
from tests.server.harness import chat_request
from tests.server.served import SERVE_FLAGS


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _is_spawned_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.slow
def test_serve_tp2_mixed_adapters_then_worker_killed(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([*loraplex_command(), "serve", *SERVE_FLAGS, "--tensor-parallel-size", "2",
                                 "--log-level", "INFO"], stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # metrics line
        line = proc.stdout.readline()
        assert "serving" in line, (line, log.read_text()[-3000:])
        target = line.strip().rsplit(" ", 1)[1]
        core = [p for p in _children(proc.pid) if _is_spawned_worker(p)]
        assert len(core) == 1, core
        workers = [p for p in _children(core[0]) if _is_spawned_worker(p)]
        assert len(workers) == 2, workers
        with Client(target) as client:
            texts = ["Hello world", "abc 123", "tensor parallel"]
            asks = [(a, t) for t in texts for a in ("", "reverse", "upper")]
            with ThreadPoolExecutor(len(asks)) as pool:  # one continuous batch of mixed adapters
                got = list(pool.map(lambda at: client.generate(chat_request(at[1], adapter=at[0]), timeout=120).text,
                                    asks))
            assert got == [expected_output(a, t) for a, t in asks]
            assert client.health()
            stream = client.generate_stream(chat_request("die", max_tokens=200, ignore_eos=True), timeout=60)
            next(stream)
            os.kill(workers[1], signal.SIGKILL)
            start = time.monotonic()
            error = ""
            try:
                error = list(stream)[-1].error
            except grpc.RpcError as exc:
                error = exc.details() or ""
            assert "tensor-parallel worker" in error and "SIGKILL" in error, error
            assert time.monotonic() - start < 10
            deadline = time.monotonic() + 10
            while client.health() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not client.health()
            with pytest.raises(grpc.RpcError) as err:
                client.generate(chat_request("after death"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "workers outlived the server"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
