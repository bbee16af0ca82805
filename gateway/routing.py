"""Routing across backend replicas: a pool of clients (static addresses and/or the A/AAAA
records of a DNS name, re-resolved periodically), their health (a periodic ``health()`` poll)
and their in-flight calls.

A request for an adapter goes to the healthy backend with the highest rendezvous score
``sha256(adapter, address)`` (the same choice on every gateway replica), so the adapter's
requests meet its resident weights; if that backend carries more than ``max_imbalance``
calls above the least loaded one, the least loaded takes it. Requests for the base model go
to the least-loaded healthy backend (ties in turn). With no healthy backend, every backend
is a candidate, so a lone backend behaves exactly as without routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from loraplex.gateway.errors import OpenAIError
from loraplex.gateway.metrics import GatewayMetrics
from loraplex.gateway.state import BackendClient

log = logging.getLogger("loraplex.gateway.routing")

Resolver = Callable[..., Sequence[tuple[Any, ...]]]
ClientMaker = Callable[[str], BackendClient]


def score(adapter: str, address: str) -> int:
    """The rendezvous score of ``address`` for ``adapter``: stable across processes and hosts."""
    digest = hashlib.sha256(f"{adapter}\x00{address}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rendezvous_order(adapter: str, addresses: Sequence[str]) -> list[str]:
    """``addresses`` from the adapter's owner down (highest score first)."""
    return sorted(addresses, key=lambda a: (score(adapter, a), a), reverse=True)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{target!r}: must be NAME:PORT")
    return host.strip("[]"), int(port)


class Backend:
    """One backend address: its client, calls in flight and last known health."""

    def __init__(self, address: str, client: BackendClient) -> None:
        self.address = address
        self.client = client
        self.in_flight = 0
        self.healthy = True  # optimistic until the first poll answers


class Lease:
    """One request's calls on one backend; ``release`` (idempotent) ends them."""

    def __init__(self, router: Router, backend: Backend, calls: int) -> None:
        self.router = router
        self.backend = backend
        self.calls = calls
        self._released = False
        backend.in_flight += calls

    @property
    def client(self) -> BackendClient:
        return self.backend.client

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.backend.in_flight -= self.calls
            self.router._reap()


class Router:
    def __init__(self, make_client: ClientMaker, *, static: Sequence[str] = (), dns: str | None = None,
                 refresh_seconds: float = 10.0, health_seconds: float = 2.0, max_imbalance: int = 32,
                 metrics: GatewayMetrics | None = None, resolver: Resolver = socket.getaddrinfo) -> None:
        self._make_client = make_client
        self._static = list(dict.fromkeys(static))
        self._dns = split_host_port(dns) if dns else None
        self.refresh_seconds = refresh_seconds
        self.health_seconds = health_seconds
        self.max_imbalance = max_imbalance
        self._metrics = metrics
        self._resolver = resolver
        self.backends: dict[str, Backend] = {}
        self._retired: list[Backend] = []
        self._closing: set[asyncio.Task[None]] = set()  # strong references until each close ends
        self._turn = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._set_addresses(self._static)

    # --- membership -------------------------------------------------------------------------

    def _set_addresses(self, addresses: Sequence[str]) -> None:
        wanted = list(dict.fromkeys(addresses))
        for address in list(self.backends):
            if address not in wanted:
                self._retired.append(self.backends.pop(address))
                log.info("backend %s removed", address)
        for address in wanted:
            if address not in self.backends:
                self.backends[address] = Backend(address, self._make_client(address))
                log.info("backend %s added", address)
        self._update_gauge()

    def _reap(self) -> None:
        """Closes retired clients whose calls have all ended."""
        idle = [b for b in self._retired if b.in_flight <= 0]
        self._retired = [b for b in self._retired if b.in_flight > 0]
        for backend in idle:
            with contextlib.suppress(RuntimeError):
                task = asyncio.get_running_loop().create_task(self._close(backend))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(backend: Backend) -> None:
        with contextlib.suppress(Exception):
            await backend.client.close()

    async def refresh_dns(self) -> None:
        """Re-resolves the DNS name; keeps the current set when resolution fails."""
        if self._dns is None:
            return
        host, port = self._dns
        try:
            infos = await asyncio.to_thread(self._resolver, host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("resolving %s failed: %s; keeping %d backends", host, exc, len(self.backends))
            return
        found = sorted({format_address(str(info[4][0]), port) for info in infos})
        self._set_addresses([*self._static, *found])
        self._reap()

    async def poll_health(self) -> None:
        backends = list(self.backends.values())
        results = await asyncio.gather(*(b.client.health() for b in backends), return_exceptions=True)
        for backend, result in zip(backends, results, strict=True):
            healthy = result is True
            if healthy != backend.healthy:
                log.info("backend %s is now %s", backend.address, "healthy" if healthy else "unhealthy")
            backend.healthy = healthy
        self._update_gauge()

    def mark_unhealthy(self, backend: Backend) -> None:
        backend.healthy = False
        self._update_gauge()

    def _update_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.backends_healthy.set(sum(b.healthy for b in self.backends.values()))

    async def start(self) -> None:
        await self.refresh_dns()
        self._tasks = [asyncio.create_task(self._every(self.health_seconds, self.poll_health))]
        if self._dns is not None:
            self._tasks.append(asyncio.create_task(self._every(self.refresh_seconds, self.refresh_dns)))

    @staticmethod
    async def _every(seconds: float, job: Callable[[], Any]) -> None:
        while True:
            try:
                await job()
            except Exception:  # noqa: BLE001 - a failed round must not end the loop
                log.exception("background routing job failed")
            await asyncio.sleep(seconds)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for backend in [*self.backends.values(), *self._retired]:
            await self._close(backend)
        self.backends.clear()
        self._retired.clear()

    # --- choice -----------------------------------------------------------------------------

    def candidates(self) -> list[Backend]:
        """The healthy backends; all of them when none is healthy (a lone backend's own error shows)."""
        if not self.backends:
            raise OpenAIError(503, "no backend is known (DNS found none yet)", code="backend_unavailable")
        healthy = [b for b in self.backends.values() if b.healthy]
        return healthy or list(self.backends.values())

    def least_loaded(self, backends: Sequence[Backend] | None = None) -> Backend:
        pool = list(backends) if backends is not None else self.candidates()
        low = min(b.in_flight for b in pool)
        tied = [b for b in pool if b.in_flight == low]
        return tied[next(self._turn) % len(tied)]

    def choose(self, adapter: str, *, exclude: Sequence[Backend] = ()) -> Backend:
        pool = [b for b in self.candidates() if b not in exclude] or self.candidates()
        if not adapter:
            return self.least_loaded(pool)
        by_address = {b.address: b for b in pool}
        owner = by_address[rendezvous_order(adapter, list(by_address))[0]]
        low = min(b.in_flight for b in pool)
        if owner.in_flight - low > self.max_imbalance:
            return self.least_loaded(pool)
        return owner

    def all_full(self, capacity: int) -> bool:
        """Whether every candidate backend already carries ``capacity`` calls from this gateway alone
        (0 = unknown: never). Other clients only add to a backend's load, so such a backend would
        refuse the next call anyway."""
        return capacity > 0 and all(b.in_flight >= capacity for b in self.candidates())

    def lease(self, adapter: str, calls: int, *, exclude: Sequence[Backend] = ()) -> Lease:
        backend = self.choose(adapter, exclude=exclude)
        if self._metrics is not None:
            self._metrics.backend_requests.labels(backend.address).inc()
        return Lease(self, backend, calls)
