"""A real ``loraplex serve`` process on free loopback ports, as a user starts it: the tests that
measure the server itself (floods, memory, drains) talk to it from other processes, so nothing
the test or its clients do runs in the server's interpreter."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import loraplex_command

SERVE_FLAGS = ["--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
               "--metrics-port", "0", "--grace-period", "30", "--max-model-len", "256",
               "--kv-cache-memory-bytes", str(32 * 2**20)]


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    target: str
    metrics_url: str
    log: Path

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_serve(log: Path, *flags: str, base: Sequence[str] = SERVE_FLAGS) -> ServeProcess:
    """``loraplex serve`` with ``base`` then ``flags`` (later flags win), its stderr in ``log``;
    returns once it prints where it serves."""
    with open(log, "w") as log_file:
        proc = subprocess.Popen([*loraplex_command(), "serve", *base, *flags, "--log-level", "INFO"],
                                stdout=subprocess.PIPE, stderr=log_file, text=True)
    assert proc.stdout is not None
    metrics_line = proc.stdout.readline()  # "loraplex: metrics on http://<host>:<port>/metrics"
    line = proc.stdout.readline()  # "loraplex: serving <model> on <host>:<port>"
    if "metrics on" not in metrics_line or "serving" not in line:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"serve did not start: {metrics_line!r} {line!r}\n{log.read_text()[-3000:]}")
    return ServeProcess(proc, line.strip().rsplit(" ", 1)[1], metrics_line.strip().rsplit(" ", 1)[1], log)
