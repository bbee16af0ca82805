"""Sends a workload on its arrival schedule, bounded by concurrency, count and time; shows progress."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TextIO

from loraplex.clients.bench.grpc_endpoint import SamplingChoice
from loraplex.clients.bench.records import RequestRecord
from loraplex.clients.bench.workload import BenchRequest


class Endpoint(Protocol):
    async def send(self, req: BenchRequest, sampling: SamplingChoice, rec: RequestRecord) -> None: ...


@dataclass
class RunLimits:
    max_concurrency: int | None = None  # most requests in flight; None = no bound
    duration: float | None = None  # stop sending after this many seconds; None = send them all


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int, label: str, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total, self.label, self.enabled, self.stream = total, label, enabled, stream
        self.done = self.failed = 0
        self._start = time.perf_counter()
        self._drawn = 0.0

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        self.failed += not rec.success
        now = time.perf_counter()
        if self.enabled and (now - self._drawn > 0.1 or self.done == self.total):
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        elapsed = now - self._start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                          f"failed {self.failed} {elapsed:6.1f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


async def run_requests(endpoint: Endpoint, requests: Sequence[BenchRequest], times: Sequence[float],
                       sampling: SamplingChoice, limits: RunLimits,
                       progress: Progress) -> tuple[list[RequestRecord], float]:
    """Sends each request at its arrival time (later when ``max_concurrency`` are in flight), stops
    sending at ``duration``, waits for what was sent; the records of the sent requests and the run's
    duration (first send → last answer)."""
    slots = asyncio.Semaphore(limits.max_concurrency) if limits.max_concurrency else None
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []
    t0 = time.perf_counter()

    async def one(req: BenchRequest, rec: RequestRecord) -> None:
        try:
            rec.start = time.perf_counter() - t0
            await endpoint.send(req, sampling, rec)
        except Exception as exc:  # one request's surprise is its failure, not the run's end
            rec.fail(type(exc).__name__, str(exc))
        finally:
            if slots:
                slots.release()
            progress.update(rec)

    for req, at in zip(requests, times, strict=True):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots:
            await slots.acquire()
        if limits.duration is not None and time.perf_counter() - t0 >= limits.duration:
            if slots:
                slots.release()
            break
        rec = RequestRecord(index=req.index, adapter=req.adapter, prompt_len=req.prompt_len)
        records.append(rec)
        tasks.append(asyncio.create_task(one(req, rec)))
    await asyncio.gather(*tasks)
    return records, time.perf_counter() - t0


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"
