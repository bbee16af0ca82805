"""A real Prometheus (Debian's ``prometheus``) scrapes a real ``loraplex serve`` and ``loraplex
gateway`` under mixed-adapter traffic: every query of every panel of the shipped Grafana dashboard
returns data, and ``promtool check metrics`` accepts both endpoints (vLLM's colons aside)."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gateway"))
from e2e_stack import Stack, start_stack, stop_processes  # noqa: E402

from loraplex.backend.demo import DEMO_ADAPTERS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "loraplex" / "dashboards" / "loraplex.json"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
NOT_INSTALLED = "Debian's prometheus package is not installed (apt-get install prometheus)"
pytestmark = pytest.mark.slow


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with Grafana's variables filled as Grafana would."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"].replace("$__rate_interval", "10s").replace("$model_name", ".*"))
            for p in panels for t in p.get("targets", [])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_port(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("prom-stack"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip(NOT_INSTALLED)
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: loraplex-backend\n    static_configs: [{{targets: ['{host_port(stack.metrics_url)}']}}]\n"
        f"  - job_name: loraplex-gateway\n    static_configs: [{{targets: ['{host_port(stack.url)}']}}]\n")
    url = f"http://127.0.0.1:{free_port()}"
    with open(work / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address={host_port(url)}"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        yield url
    finally:
        stop_processes([proc])


def query(prom: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}",
                                timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def has_data(prom: str, expr: str) -> bool:
    try:
        return any(math.isfinite(float(r["value"][1])) for r in query(prom, expr))
    except OSError:
        return False  # Prometheus still starting


def traffic(stack: Stack, stop: threading.Event) -> None:
    """Mixed adapters, streamed and not, until told to stop."""
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for n in range(10_000):
        if stop.is_set():
            return
        model = ("upper", "reverse", "upper-copy")[n % 3]
        messages = [{"role": "user", "content": f"dashboards need data {n}"}]
        if n % 2:
            list(client.chat.completions.create(model=model, messages=messages, max_tokens=24, stream=True))
        else:
            client.chat.completions.create(model=model, messages=messages, max_tokens=24)


def test_every_dashboard_query_returns_data(stack: Stack, prometheus: str) -> None:
    body = json.dumps({"lora_name": "upper-copy", "lora_path": str(DEMO_ADAPTERS["upper"])}).encode()
    load = urllib.request.Request(stack.url + "/v1/load_lora_adapter", body, {"content-type": "application/json"})
    urllib.request.urlopen(load, timeout=30).close()  # the AIBrix-style route: counts an adapter operation
    stop = threading.Event()
    sender = threading.Thread(target=traffic, args=(stack, stop), daemon=True)
    sender.start()
    queries = dashboard_queries()
    assert len(queries) >= 20
    missing = list(queries)
    deadline = time.monotonic() + 45
    try:
        while missing and time.monotonic() < deadline:
            missing = [(title, expr) for title, expr in missing if not has_data(prometheus, expr)]
            time.sleep(1)
    finally:
        stop.set()
        sender.join(60)
    assert not missing, f"dashboard queries without data: {missing}"


@pytest.mark.parametrize("which", ["backend", "gateway"])
def test_promtool_accepts_the_live_endpoints(stack: Stack, which: str) -> None:
    if PROMTOOL is None:
        pytest.skip(NOT_INSTALLED)
    url = stack.metrics_url if which == "backend" else stack.url + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if line.strip() and "metric names should not contain ':'" not in line]
    assert not problems, problems
