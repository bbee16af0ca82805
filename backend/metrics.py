"""Prometheus metrics, all prefixed ``loraplex_``, in one registry per server.

Two sources:
- what the engine keeps (queue lengths, KV blocks, tokens, preemptions, prefix
  cache, LoRA slots / loads / evictions / per-adapter counts) is read from
  ``engine.stats()`` at scrape time by ``EngineStatsCollector``;
- request-level histograms (TTFT, inter-token latency, end-to-end, queue time)
  and outcomes are observed by the servicer through ``RequestTracker``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.backend.engine.stats import EngineStats
from loraplex.backend.outputs import RequestOutput

log = logging.getLogger("loraplex.metrics")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

_GAUGES = (
    ("num_requests_waiting", "Requests waiting to be scheduled", "num_waiting"),
    ("num_requests_running", "Requests in the running batch", "num_running"),
    ("kv_cache_blocks_total", "KV-cache blocks", "kv_blocks_total"),
    ("kv_cache_blocks_used", "KV-cache blocks held by requests", "kv_blocks_used"),
    ("kv_cache_usage_ratio", "Share of KV-cache blocks held by requests (0-1)", "kv_usage"),
    ("lora_slots_total", "GPU adapter slots", "lora_slots_total"),
    ("lora_slots_used", "GPU adapter slots holding an adapter", "lora_slots_used"),
    ("engine_loop_alive", "1 while the engine's step loop runs", "loop_alive"),
)
_COUNTERS = (
    ("engine_steps", "Engine steps run", "num_steps"),
    ("prompt_tokens", "Prompt tokens processed", "prompt_tokens"),
    ("generation_tokens", "Tokens generated", "generation_tokens"),
    ("num_preemptions", "Requests preempted for lack of KV blocks", "preemptions"),
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
    ("prefix_cache_hits", "Prompt tokens found in the prefix cache", "prefix_cache_hits"),
    ("lora_loads", "Adapter weight loads", "adapter_loads"),
    ("lora_load_seconds", "Seconds spent loading adapter weights", "adapter_load_seconds"),
    ("lora_evictions", "Adapters evicted from GPU slots or the CPU cache", "adapter_evictions"),
)


class EngineStatsCollector(Collector):
    """Reads ``EngineStats`` at scrape time; a failing engine yields no engine metrics, never an error."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats()
        except Exception:
            log.warning("engine stats unavailable for /metrics", exc_info=True)
            return
        for name, doc, attr in _GAUGES:
            yield GaugeMetricFamily(f"loraplex_{name}", doc, value=float(getattr(s, attr)))
        for name, doc, attr in _COUNTERS:
            yield CounterMetricFamily(f"loraplex_{name}", doc, value=float(getattr(s, attr)))
        yield from _adapter_metrics(s)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _adapter_metrics(s: EngineStats) -> Iterator[Metric]:
    states = GaugeMetricFamily("loraplex_lora_adapters", "Adapters by where their weights are", labels=["state"])
    for state, count in (("resident", s.adapters_resident), ("cached", s.adapters_cached),
                         ("registered", s.adapters_registered)):
        states.add_metric([state], float(count))
    yield states
    requests = CounterMetricFamily("loraplex_lora_requests", "Requests admitted per adapter", labels=["adapter"])
    for adapter, count in sorted(s.requests_by_adapter.items()):
        requests.add_metric([adapter or "base"], float(count))
    yield requests
    tokens = CounterMetricFamily("loraplex_lora_generation_tokens", "Tokens generated per adapter",
                                 labels=["adapter"])
    for adapter, count in sorted(s.tokens_by_adapter.items()):
        tokens.add_metric([adapter or "base"], float(count))
    yield tokens


class Metrics:
    """The server's metrics; ``stats`` (usually ``engine.stats``) feeds the engine-side ones."""

    def __init__(self, stats: Callable[[], EngineStats] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Generate calls by how they ended", ["outcome"], registry=r)
        self.in_flight = Gauge("loraplex_grpc_streams_in_flight", "Generate streams open now", registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Time between generated tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_e2e_request_latency_seconds", "Arrival to the end of the request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("loraplex_request_queue_time_seconds", "Arrival to first scheduled",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.adapter_ops = Counter("loraplex_adapter_operations", "Adapter management calls by result",
                                   ["op", "outcome"], registry=r)
        self.adapter_op_seconds = Histogram("loraplex_adapter_operation_seconds",
                                            "Latency of adapter management calls (load includes weights)",
                                            ["op"], buckets=_LATENCY_BUCKETS, registry=r)
        if stats is not None:
            r.register(EngineStatsCollector(stats))

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)

    def adapter_op(self, op: str, outcome: str, seconds: float) -> None:
        self.adapter_ops.labels(op=op, outcome=outcome).inc()
        self.adapter_op_seconds.labels(op=op).observe(seconds)

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Starts ``/metrics`` on a daemon thread; returns the server and its bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)


class RequestTracker:
    """Observes one Generate call's latencies from its deltas, and its outcome once."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._last_token_at = 0.0
        self._done = False

    def __enter__(self) -> RequestTracker:
        self._m.in_flight.inc()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._m.in_flight.dec()

    def on_output(self, out: RequestOutput, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if out.new_token_ids:
            if self._last_token_at == 0.0:
                self._m.ttft.observe(out.timings.time_to_first_token or 0.0)
            else:
                gap = (now - self._last_token_at) / len(out.new_token_ids)
                for _ in out.new_token_ids:
                    self._m.itl.observe(gap)
            self._last_token_at = now
        if out.finished:
            self._m.e2e.observe(out.timings.e2e_latency)
            self._m.queue.observe(out.timings.queue_time)
            self.finish(out.finish_reason or "stop")

    def finish(self, outcome: str) -> None:
        """Counts the request once under ``outcome`` ("stop", "length", "abort", "cancelled", a status name)."""
        if not self._done:
            self._done = True
            self._m.requests.labels(outcome=outcome).inc()
