"""Real ``loraplex serve`` and ``loraplex gateway`` processes on free loopback ports, as a user starts them.

Used by ``bench/serve_suite.py`` and by the tests of ``loraplex bench serve`` (tests/bench/).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def loraplex_command(wrap: list[str] | None = None) -> list[str]:
    """The ``loraplex`` console command as its module, so the checkout on PYTHONPATH runs (never a stale install);
    ``wrap`` goes between the interpreter and the module (``["-m", "cProfile", "-o", FILE]``)."""
    return [sys.executable, *(wrap or []), "-m", "loraplex.backend.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """A backend (gRPC ``target``) and, once started, a gateway (``url`` ends in /v1)."""

    target: str = ""
    url: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-chars:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        """SIGTERM, last started first; kill what has not exited after 30 s."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()


def start_serve(flags: list[str], log_dir: Path, name: str = "serve", wrap: list[str] | None = None) -> Stack:
    """``loraplex serve FLAGS`` on a free port; returns once it says it is serving."""
    log = log_dir / f"{name}.log"
    base = ["--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*loraplex_command(wrap), "serve", *base, *flags], stdout=subprocess.PIPE, stderr=out)
    assert proc.stdout is not None
    lines = [proc.stdout.readline().decode() for _ in range(2)]  # "metrics on URL", "serving MODEL on HOST:PORT"
    if "serving" not in lines[1]:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"serve did not start: {lines!r}\n{log.read_text(errors='replace')[-4000:]}")
    return Stack(target=lines[1].strip().rsplit(" ", 1)[1], procs=[proc], logs=[log])


def start_gateway(stack: Stack, log_dir: Path, extra: list[str] | None = None, timeout: float = 90) -> str:
    """``loraplex gateway`` in front of ``stack``'s backend; sets and returns ``stack.url`` (…/v1)."""
    port = free_port()
    log = log_dir / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*loraplex_command(), "gateway", "--backend", stack.target, "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning", *(extra or [])],
                                stdout=out, stderr=subprocess.STDOUT)
    stack.procs.append(proc)
    stack.logs.append(log)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(root + "/health", timeout=5) as resp:
                if resp.status == 200:
                    stack.url = root + "/v1"
                    return stack.url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gateway not healthy after {timeout}s:\n{log.read_text(errors='replace')}")
