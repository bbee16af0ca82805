"""Adapter-affinity routing across backend replicas: rendezvous choice, fallbacks, DNS refresh,
and end to end with two real ``loraplex serve`` processes behind one real gateway."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_stack import SERVE_FLAGS, stop_processes, wait_healthy
from gateway_harness import free_port

from loraplex.clients import Client, pb
from loraplex.errors import ConfigError
from loraplex.gateway import cli
from loraplex.gateway.config import GatewayConfig
from loraplex.gateway.errors import OpenAIError
from loraplex.gateway.metrics import GatewayMetrics
from loraplex.gateway.routing import Router, format_address, rendezvous_order, score
from tests.helpers import loraplex_command, metric_value


class FakeClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.serving = True
        self.closed = False

    async def health(self) -> bool:
        if self.serving is None:
            raise ConnectionError("down")
        return self.serving

    async def close(self) -> None:
        self.closed = True


def router(addresses: list[str], **kwargs: Any) -> tuple[Router, dict[str, FakeClient]]:
    clients: dict[str, FakeClient] = {}

    def make(address: str) -> FakeClient:
        clients[address] = FakeClient(address)
        return clients[address]

    return Router(make, static=addresses, **kwargs), clients  # type: ignore[arg-type]


ADDRS = [f"10.0.0.{i}:50051" for i in range(1, 6)]
ADAPTERS = [f"adapter-{i}" for i in range(200)]


# --- rendezvous choice -------------------------------------------------------------------------

def test_score_is_stable_and_not_pythons_hash() -> None:
    # sha256-based: the same on every gateway replica and every run (PYTHONHASHSEED-proof)
    assert score("reverse", "10.0.0.1:50051") == score("reverse", "10.0.0.1:50051")
    code = "from loraplex.gateway.routing import score; print(score('reverse', '10.0.0.1:50051'))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {f"{score('reverse', '10.0.0.1:50051')}\n"}


def test_choice_is_deterministic_and_order_independent() -> None:
    r1, _ = router(ADDRS)
    r2, _ = router(list(reversed(ADDRS)))
    for adapter in ADAPTERS[:50]:
        assert r1.choose(adapter).address == r2.choose(adapter).address == rendezvous_order(adapter, ADDRS)[0]


def test_adapters_spread_over_backends() -> None:
    r, _ = router(ADDRS)
    owners = Counter(r.choose(a).address for a in ADAPTERS)
    assert set(owners) == set(ADDRS)
    assert min(owners.values()) >= len(ADAPTERS) / len(ADDRS) / 2  # 40 each on average


def test_removing_a_backend_moves_only_its_adapters() -> None:
    before = {a: rendezvous_order(a, ADDRS)[0] for a in ADAPTERS}
    gone = ADDRS[2]
    after = {a: rendezvous_order(a, [x for x in ADDRS if x != gone])[0] for a in ADAPTERS}
    moved = {a for a in ADAPTERS if before[a] != after[a]}
    assert moved == {a for a in ADAPTERS if before[a] == gone}
    # and each moved adapter lands on its second choice
    assert all(after[a] == rendezvous_order(a, ADDRS)[1] for a in moved)


def test_all_full_only_when_every_healthy_backend_carries_its_capacity() -> None:
    r, clients = router(ADDRS[:2])
    assert not r.all_full(2) and not r.all_full(0)
    leases = [r.lease("", 1) for _ in range(3)]  # least loaded in turn: 2 on one backend, 1 on the other
    assert not r.all_full(2)
    leases.append(r.lease("", 1))
    assert r.all_full(2) and not r.all_full(3) and not r.all_full(0)  # 0: capacity unknown, never full
    leases.pop().release()
    assert not r.all_full(2)
    busy, idle = sorted(r.backends.values(), key=lambda b: -b.in_flight)
    assert (busy.in_flight, idle.in_flight) == (2, 1)
    clients[idle.address].serving = False  # only healthy backends count
    asyncio.run(r.poll_health())
    assert r.all_full(2)
    clients[idle.address].serving, clients[busy.address].serving = True, False
    asyncio.run(r.poll_health())
    assert not r.all_full(2)
    for lease in leases:
        lease.release()


def test_unhealthy_owner_gives_way_to_the_next_in_rendezvous_order() -> None:
    r, clients = router(ADDRS, metrics=GatewayMetrics())
    adapter = "reverse"
    order = rendezvous_order(adapter, ADDRS)
    clients[order[0]].serving = False
    clients[order[1]].serving = None  # unreachable
    asyncio.run(r.poll_health())
    assert r.choose(adapter).address == order[2]
    assert "loraplex_gateway_backends_healthy 3.0" in r._metrics.exposition().decode()  # type: ignore[union-attr]
    for c in clients.values():
        c.serving = False
    asyncio.run(r.poll_health())
    assert r.choose(adapter).address == order[0]  # none healthy: a lone backend's own error shows


def test_overloaded_owner_falls_back_to_the_least_loaded() -> None:
    r, _ = router(ADDRS[:2], max_imbalance=4)
    owner, other = (r.backends[a] for a in rendezvous_order("upper", ADDRS[:2]))
    held = [r.lease("upper", 1) for _ in range(5)]
    assert all(lease.backend is owner for lease in held)  # 4 above the other: still the owner
    assert owner.in_flight == 5 and r.choose("upper") is other  # 5 > 4: the least loaded
    held[0].release()
    held[0].release()  # idempotent
    assert owner.in_flight == 4 and r.choose("upper") is owner


def test_n_calls_share_one_lease_and_base_requests_take_turns() -> None:
    r, _ = router(ADDRS[:2])
    lease = r.lease("", 3)
    assert lease.backend.in_flight == 3
    other = r.choose("")
    assert other is not lease.backend  # least loaded
    lease.release()
    picks = Counter(r.choose("").address for _ in range(10))
    assert picks == {ADDRS[0]: 5, ADDRS[1]: 5}  # ties take turns


def test_no_backend_known_is_a_503() -> None:
    r, _ = router([])
    with pytest.raises(OpenAIError) as info:
        r.choose("x")
    assert info.value.status == 503


# --- DNS -------------------------------------------------------------------------------------

def test_dns_refresh_adds_and_removes_backends() -> None:
    answers: list[Any] = [["10.1.0.1", "10.1.0.2", "fd00::3"]]
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        calls.append((host, port))
        if isinstance(answers[0], Exception):
            raise answers[0]
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in answers[0]]

    async def scenario() -> None:
        r, clients = router([], dns="svc.ns.svc.cluster.local:50051", resolver=resolver)
        await r.refresh_dns()
        assert calls == [("svc.ns.svc.cluster.local", 50051)]
        assert set(r.backends) == {"10.1.0.1:50051", "10.1.0.2:50051", "[fd00::3]:50051"}
        first = r.backends["10.1.0.1:50051"]
        lease = r.lease("reverse", 1) if r.choose("reverse") is first else None
        answers[0] = ["10.1.0.2", "10.1.0.4"]
        await r.refresh_dns()
        assert set(r.backends) == {"10.1.0.2:50051", "10.1.0.4:50051"}
        await asyncio.sleep(0)
        assert clients["[fd00::3]:50051"].closed
        if lease is not None:  # a removed backend's client closes once its calls end
            assert not clients["10.1.0.1:50051"].closed
            lease.release()
            await asyncio.sleep(0)
        assert clients["10.1.0.1:50051"].closed
        assert not clients["10.1.0.2:50051"].closed
        answers[0] = socket.gaierror("temporary failure")
        await r.refresh_dns()  # a failed lookup keeps the known backends
        assert set(r.backends) == {"10.1.0.2:50051", "10.1.0.4:50051"}
        await r.close()
        assert clients["10.1.0.4:50051"].closed

    asyncio.run(scenario())


def test_dns_refresh_runs_periodically() -> None:
    seen: list[float] = []

    def resolver(host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        seen.append(time.monotonic())
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"10.2.0.{len(seen)}", port))]

    async def scenario() -> None:
        r, _ = router([], dns="svc:7", resolver=resolver, refresh_seconds=0.05, health_seconds=0.05)
        await r.start()
        await asyncio.sleep(0.3)
        assert len(seen) >= 3 and len(r.backends) == 1  # each answer replaces the previous
        await r.close()

    asyncio.run(scenario())


def test_format_address() -> None:
    assert format_address("10.0.0.1", 1) == "10.0.0.1:1" and format_address("::1", 2) == "[::1]:2"


def test_cli_backends_and_dns_flags() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    one = cli.config_from_args(parser.parse_args(["--backend", "a:1"]))
    assert (one.backend, one.static_backends()) == (["a:1"], ["a:1"])
    two = cli.config_from_args(parser.parse_args(["--backend", "a:1", "--backend", "b:2",
                                                  "--affinity-max-imbalance", "5"]))
    assert two.static_backends() == ["a:1", "b:2"] and two.affinity_max_imbalance == 5
    dns = cli.config_from_args(parser.parse_args(["--backend-dns", "svc:50051", "--backend-refresh-seconds", "3"]))
    assert dns.static_backends() == [] and (dns.backend_dns, dns.backend_refresh_seconds) == ("svc:50051", 3.0)
    both = cli.config_from_args(parser.parse_args(["--backend", "a:1", "--backend-dns", "svc:50051"]))
    assert both.static_backends() == ["a:1"]
    for bad in ({"backend_dns": "svc"}, {"backend": ["nocolon"]}, {"backend_refresh_seconds": 0},
                {"affinity_max_imbalance": -1}):
        with pytest.raises(ConfigError):
            GatewayConfig(**bad)  # type: ignore[arg-type]


# --- in process: two fake backends behind the gateway -------------------------------------------

def test_adapter_routes_reach_every_backend_and_health_needs_one() -> None:
    from fake_backend import BASE
    from gateway_harness import GatewayHarness

    gw = GatewayHarness(extra_backends=1)
    a, b = gw.servicer, gw.extras[0][1]
    try:
        r = httpx.post(gw.url + "/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": "/adapters/x"})
        assert r.status_code == 200 and "mine" in a.adapters and "mine" in b.adapters
        b.adapters["only-b"] = pb.AdapterInfo(name="only-b", version=1, source="/adapters/b", rank=8)
        ids = [m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]]
        assert ids[0] == BASE and "only-b" in ids and "mine" in ids and len(ids) == len(set(ids))
        # success only when every backend succeeds; else the first error, in OpenAI's shape
        r = httpx.post(gw.url + "/v1/load_lora_adapter", json={"lora_name": "only-b", "lora_path": "/adapters/x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "already_exists"
        del a.adapters["mine"]
        r = httpx.post(gw.url + "/v1/unload_lora_adapter", json={"lora_name": "mine"})
        assert r.status_code == 404 and "mine" not in b.adapters
        # /health: 200 while one backend serves
        a.serving = False
        assert httpx.get(gw.url + "/health").status_code == 200
        b.serving = False
        assert httpx.get(gw.url + "/health").json()["error"]["code"] == "backend_not_serving"
        a.serving = b.serving = True
        # a generation for an adapter goes to its owner, every time
        owner = rendezvous_order("reverse", gw.config.backend)[0]
        owner_servicer = a if owner == gw.config.backend[0] else b
        before = len(owner_servicer.requests)
        for _ in range(3):
            assert httpx.post(gw.url + "/v1/completions", json={"model": "reverse", "prompt": "ab"}).status_code == 200
        assert len(owner_servicer.requests) == before + 3
    finally:
        gw.close()


# --- end to end: two real backends, one real gateway --------------------------------------------

def _demo_built() -> bool:
    from loraplex.backend.demo import DEMO_MODEL_DIR

    return (DEMO_MODEL_DIR / "config.json").exists()


class TwoBackends:
    def __init__(self, log_dir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.targets: list[str] = []
        self.metrics_urls: list[str] = []
        serves = []
        for i in range(2):
            log_path = log_dir / f"serve-{i}.log"
            with open(log_path, "wb") as log:
                serves.append(subprocess.Popen([*loraplex_command(), "serve", *SERVE_FLAGS, "--max-model-len", "256"],
                                               stdout=subprocess.PIPE, stderr=log))
            self.procs.append(serves[-1])
            self.logs.append(log_path)
        for proc, log_path in zip(serves, self.logs, strict=True):
            assert proc.stdout is not None
            metrics_line = proc.stdout.readline().decode()
            serving_line = proc.stdout.readline().decode()
            if "serving" not in serving_line:
                self.stop()
                raise RuntimeError(f"serve did not start: {serving_line!r}\n{log_path.read_text()}")
            self.targets.append(serving_line.strip().rsplit(" ", 1)[1])
            self.metrics_urls.append(metrics_line.strip().rsplit(" ", 1)[1])
        port = free_port()
        gw_log = log_dir / "gateway.log"
        with open(gw_log, "wb") as log:
            gw = subprocess.Popen([*loraplex_command(), "gateway", "--backend", self.targets[0], "--backend",
                                   self.targets[1], "--backend-health-seconds", "0.5", "--host", "127.0.0.1",
                                   "--port", str(port), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(gw)
        self.logs.append(gw_log)
        self.url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(self.url, gw, gw_log)
        except Exception:
            self.stop()
            raise

    def requests_for(self, i: int, adapter: str) -> float:
        text = httpx.get(self.metrics_urls[i], timeout=10).text
        return metric_value(text, "loraplex_lora_requests_total", f'adapter="{adapter}"')

    def adapters_of(self, i: int) -> set[str]:
        with Client(self.targets[i]) as c:
            return {a.name for a in c.list_adapters()}

    def stop(self) -> None:
        stop_processes(self.procs)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoBackends]:
    if not _demo_built():
        pytest.skip("the demo model's weights are not built")
    stack = TwoBackends(tmp_path_factory.mktemp("routing"))
    yield stack
    stack.stop()


def _complete(url: str, model: str, prompt: str = "Hello") -> str:
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6,
                                                   "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_e2e_two_backends_affinity_adapters_and_failover(two: TwoBackends) -> None:
    from loraplex.backend.demo import DEMO_ADAPTERS, DEMO_MODEL_NAME

    # each demo adapter's requests land on its rendezvous owner only
    for adapter in DEMO_ADAPTERS:
        for _ in range(2):
            _complete(two.url, adapter)
    for adapter in DEMO_ADAPTERS:
        owner = two.targets.index(rendezvous_order(adapter, two.targets)[0])
        assert (two.requests_for(owner, adapter), two.requests_for(1 - owner, adapter)) == (2.0, 0.0), adapter

    # base-model requests spread (least loaded; ties take turns); n=3 stays on one backend
    for _ in range(4):
        _complete(two.url, DEMO_MODEL_NAME)
    assert two.requests_for(0, "base") >= 1 and two.requests_for(1, "base") >= 1
    before = [two.requests_for(i, "base") for i in range(2)]
    r = httpx.post(two.url + "/v1/completions", json={"model": DEMO_MODEL_NAME, "prompt": "Hi", "max_tokens": 4,
                                                      "n": 3}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    added = sorted(two.requests_for(i, "base") - before[i] for i in range(2))
    assert added == [0.0, 3.0]
    metrics = httpx.get(two.url + "/metrics").text
    assert sum(metric_value(metrics, "loraplex_gateway_backend_requests_total", f'backend="{t}"')
               for t in two.targets) == 2 * len(DEMO_ADAPTERS) + 5
    assert metric_value(metrics, "loraplex_gateway_backends_healthy") == 2.0

    # load / unload reach both backends; /v1/models is their union
    path = str(DEMO_ADAPTERS["upper"])
    r = httpx.post(two.url + "/v1/load_lora_adapter", json={"lora_name": "e2e-shout", "lora_path": path}, timeout=60)
    assert r.status_code == 200, r.text
    assert all("e2e-shout" in two.adapters_of(i) for i in range(2))
    assert "e2e-shout" in {m["id"] for m in httpx.get(two.url + "/v1/models").json()["data"]}
    assert _complete(two.url, "e2e-shout", "quiet") == _complete(two.url, "upper", "quiet")
    again = httpx.post(two.url + "/v1/load_lora_adapter", json={"lora_name": "e2e-shout", "lora_path": path})
    assert again.status_code == 400 and again.json()["error"]["code"] == "already_exists"
    r = httpx.post(two.url + "/v1/unload_lora_adapter", json={"lora_name": "e2e-shout"}, timeout=60)
    assert r.status_code == 200, r.text
    assert not any("e2e-shout" in two.adapters_of(i) for i in range(2))

    # killing one backend: every request still succeeds on the other
    victim = two.targets.index(rendezvous_order("reverse", two.targets)[0])
    two.procs[victim].kill()
    two.procs[victim].wait(10)
    for model in [*DEMO_ADAPTERS, DEMO_MODEL_NAME] * 2:
        _complete(two.url, model)
    assert httpx.get(two.url + "/health").status_code == 200
    survivor = 1 - victim
    assert two.requests_for(survivor, "reverse") >= 2
    metrics = httpx.get(two.url + "/metrics").text
    assert metric_value(metrics, "loraplex_gateway_backends_healthy") == 1.0
