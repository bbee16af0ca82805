"""Real processes for the end-to-end tests: ``loraplex serve`` (the built-in demo model, CPU)
and ``loraplex gateway`` in front of it, on free loopback ports, as a user starts them."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from gateway_harness import free_port

from tests.helpers import loraplex_command

SERVE_FLAGS = ["--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
               "--kv-cache-memory-bytes", str(32 * 2**20)]


@dataclass
class Stack:
    target: str  # the backend's gRPC address
    metrics_url: str  # the backend's /metrics
    url: str  # the gateway's base URL (no API key)
    secure_url: str  # a second gateway, with API key API_KEY
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def backend_metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            return resp.read().decode()

    def log_tail(self) -> str:
        return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        stop_processes(self.procs)


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process (last started first), then wait; kill what does not exit in 30 s."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


API_KEY = "e2e-secret"


def start_serve(log_dir: Path, env: dict[str, str] | None = None) -> Stack:
    """``loraplex serve`` alone (``env`` added to the environment); no gateway yet."""
    serve_log = log_dir / "serve.log"
    with open(serve_log, "wb") as log:
        serve = subprocess.Popen([*loraplex_command(), "serve", *SERVE_FLAGS], stdout=subprocess.PIPE, stderr=log,
                                 env={**os.environ, **(env or {})})
    assert serve.stdout is not None
    metrics_line = serve.stdout.readline().decode()  # "loraplex: metrics on http://<host>:<port>/metrics"
    serving_line = serve.stdout.readline().decode()  # "loraplex: serving <model> on <host>:<port>"
    if "serving" not in serving_line:
        serve.kill()
        raise RuntimeError(f"serve did not start: {metrics_line!r} {serving_line!r}\n{serve_log.read_text()}")
    target = serving_line.strip().rsplit(" ", 1)[1]
    return Stack(target=target, metrics_url=metrics_line.strip().rsplit(" ", 1)[1], url="", secure_url="",
                 procs=[serve], logs=[serve_log])


def start_stack(log_dir: Path) -> Stack:
    stack = start_serve(log_dir)
    try:
        stack.url = start_gateway(stack, log_dir / "gateway.log", env={})
        stack.secure_url = start_gateway(stack, log_dir / "gateway-key.log", env={"LORAPLEX_API_KEY": API_KEY})
    except Exception:
        stack.stop()
        raise
    return stack


def start_gateway(stack: Stack, log_path: Path, env: dict[str, str]) -> str:
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*loraplex_command(), "gateway", "--backend", stack.target, "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    stack.procs.append(proc)
    stack.logs.append(log_path)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log_path)
    return url


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gateway not healthy after {timeout}s:\n{log_path.read_text()}")

