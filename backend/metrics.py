"""Prometheus metrics in one registry per server: ``loraplex_*`` families, and beside them
(unless switched off) the ``vllm:*`` families routers read (``metrics_vllm``).

Two sources:
- what the engine keeps (queue lengths, KV blocks, tokens, preemptions, prefix
  cache, LoRA slots / loads / evictions / per-adapter counts) is read from
  ``engine.stats()`` at scrape time by ``EngineStatsCollector``;
- request-level histograms (TTFT, inter-token latency, end-to-end, queue time)
  and outcomes are observed by the servicer through ``RequestTracker``; refusals at
  capacity are counted and timed by ``Metrics.refused_at_capacity``.

Every series carries ``model_name``. Per-adapter series exist only while the
adapter is registered (or still has requests in flight): an unloaded adapter's
series go away.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.backend.engine.stats import EngineStats
from loraplex.backend.metrics_vllm import ITL_BUCKETS, LATENCY_BUCKETS, VllmFamilies, VllmRequestMetrics
from loraplex.backend.outputs import RequestOutput
from loraplex.lora.types import LOAD_BUCKETS

log = logging.getLogger("loraplex.metrics")

MODEL = "model_name"
REFUSAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_GAUGES = (
    ("num_requests_waiting", "Requests waiting to be scheduled", "num_waiting"),
    ("num_requests_running", "Requests in the running batch", "num_running"),
    ("kv_cache_blocks", "KV-cache blocks in the pool", "kv_blocks_total"),
    ("kv_cache_blocks_used", "KV-cache blocks held by requests", "kv_blocks_used"),
    ("kv_cache_usage_ratio", "Share of KV-cache blocks held by requests (0-1)", "kv_usage"),
    ("lora_slots", "GPU adapter slots", "lora_slots_total"),
    ("lora_slots_used", "GPU adapter slots holding an adapter", "lora_slots_used"),
    ("engine_loop_alive", "1 while the engine's step loop runs", "loop_alive"),
    ("lora_loads_in_flight", "Adapters loading in the background (source read or GPU-slot write)",
     "adapter_loads_in_flight"),
    ("lora_slot_hit_ratio", "Share of requests on an adapter that found it in a GPU slot on arrival (since start)",
     "adapter_slot_hit_ratio"),
    ("lora_cpu_cache_hit_ratio", "Of the requests whose adapter was in no GPU slot on arrival, the share that "
     "found it in host memory (since start)", "adapter_cpu_hit_ratio"),
)
_COUNTERS = (
    ("engine_steps", "Engine steps run", "num_steps"),
    ("prompt_tokens", "Prompt tokens processed", "prompt_tokens"),
    ("generation_tokens", "Tokens generated", "generation_tokens"),
    ("num_preemptions", "Requests preempted for lack of KV blocks", "preemptions"),
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
    ("prefix_cache_hits", "Prompt tokens found in the prefix cache", "prefix_cache_hits"),
    ("lora_loads", "Adapter weight loads from their source", "adapter_source_loads"),
    ("lora_load_seconds", "Seconds spent loading adapter weights from their source", "adapter_source_load_seconds"),
    ("lora_evictions", "Adapters evicted from GPU slots", "adapter_slot_evictions"),
    ("lora_slot_lookups", "Requests on an adapter, looked up in the GPU slots on arrival", "adapter_slot_lookups"),
    ("lora_slot_hits", "Requests whose adapter was in a GPU slot on arrival", "adapter_slot_hits"),
    ("lora_cpu_cache_lookups", "Requests whose adapter was in no GPU slot on arrival", "adapter_cpu_lookups"),
    ("lora_cpu_cache_hits", "Requests whose adapter was in no GPU slot but in host memory on arrival",
     "adapter_cpu_hits"),
    ("lora_admissions_overdue", "Requests passed over past max_admission_bypass or max_admission_wait while "
     "their adapter loaded (then admitted before anyone behind them)", "adapter_admissions_overdue"),
)


class EngineStatsCollector(Collector):
    """Reads ``EngineStats`` at scrape time; a failing engine yields no engine metrics, never an error."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str, vllm: VllmFamilies | None) -> None:
        self._stats = stats
        self._model = model_name
        self._vllm = vllm

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats()
        except Exception:
            log.warning("engine stats unavailable for /metrics", exc_info=True)
            return
        for name, doc, attr in _GAUGES:
            yield _one(GaugeMetricFamily(f"loraplex_{name}", doc, labels=[MODEL]), self._model, getattr(s, attr))
        for name, doc, attr in _COUNTERS:
            yield _one(CounterMetricFamily(f"loraplex_{name}", doc, labels=[MODEL]), self._model, getattr(s, attr))
        yield from _adapter_metrics(s, self._model)
        if self._vllm is not None:
            yield from self._vllm.collect(s)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _one(family: Any, model: str, value: float) -> Metric:
    family.add_metric([model], float(value))
    return family


def live_adapters(s: EngineStats) -> set[str]:
    """Names whose per-adapter series should exist: registered, or still running or waiting."""
    return {a.name for a in s.adapter_residency} | set(s.running_adapter_names) | set(s.waiting_adapter_names)


def _adapter_metrics(s: EngineStats, model: str) -> Iterator[Metric]:
    states = GaugeMetricFamily("loraplex_lora_adapters", "Adapters by where their weights are",
                               labels=[MODEL, "state"])
    for state, count in (("resident", s.adapters_resident), ("cached", s.adapters_cached),
                         ("registered", s.adapters_registered)):
        states.add_metric([model, state], float(count))
    yield states
    yield _load_times(s, model)
    live = live_adapters(s)
    for name, doc, counts in (("loraplex_lora_requests", "Requests admitted per adapter", s.requests_by_adapter),
                              ("loraplex_lora_generation_tokens", "Tokens generated per adapter",
                               s.tokens_by_adapter)):
        family = CounterMetricFamily(name, doc, labels=[MODEL, "adapter"])
        for adapter, count in sorted(counts.items()):
            if not adapter or adapter in live:
                family.add_metric([model, adapter or "base"], float(count))
        yield family


def _load_times(s: EngineStats, model: str) -> Metric:
    family = HistogramMetricFamily("loraplex_lora_adapter_load_duration_seconds", "Background adapter loads: "
                                   "stage source = files into host memory, slot = host memory into a GPU slot",
                                   labels=[MODEL, "stage"])
    for stage, counts, total in s.adapter_load_times:
        cumulative, running = [], 0
        for bound, count in zip([*LOAD_BUCKETS, float("inf")], counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        family.add_metric([model, stage], cumulative, sum_value=total)
    return family


class Metrics:
    """The server's metrics; ``stats`` (usually ``engine.stats``) feeds the engine-side ones.

    ``vllm=False`` leaves out every ``vllm:*`` family.
    """

    def __init__(self, stats: Callable[[], EngineStats] | None = None,
                 registry: CollectorRegistry | None = None, *, model_name: str = "", vllm: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        r = self.registry
        self.requests = Counter("loraplex_requests", "Generate calls by how they ended", [MODEL, "outcome"],
                                registry=r)
        self.in_flight = Gauge("loraplex_grpc_streams_in_flight", "Generate streams open now", [MODEL],
                               registry=r).labels(model_name)
        self.ttft = _histogram("loraplex_time_to_first_token_seconds", "Arrival to first generated token",
                               LATENCY_BUCKETS, r, model_name)
        self.itl = _histogram("loraplex_inter_token_latency_seconds", "Time between generated tokens",
                              ITL_BUCKETS, r, model_name)
        self.e2e = _histogram("loraplex_e2e_request_latency_seconds", "Arrival to the end of the request",
                              LATENCY_BUCKETS, r, model_name)
        self.queue = _histogram("loraplex_request_queue_time_seconds", "Arrival to first scheduled",
                                LATENCY_BUCKETS, r, model_name)
        self.adapter_ops = Counter("loraplex_adapter_operations", "Adapter management calls by result",
                                   [MODEL, "op", "outcome"], registry=r)
        self.adapter_op_seconds = Histogram("loraplex_adapter_operation_seconds",
                                            "Latency of adapter management calls (load includes weights)",
                                            [MODEL, "op"], buckets=LATENCY_BUCKETS, registry=r)
        self.refusal_seconds = _histogram("loraplex_capacity_refusal_seconds",
                                          "Generate handler entry to its RESOURCE_EXHAUSTED refusal at capacity",
                                          REFUSAL_BUCKETS, r, model_name)
        self._refused = self.requests.labels(model_name, "resource_exhausted")
        self.vllm = VllmRequestMetrics(r, model_name) if vllm else None
        if stats is not None:
            r.register(EngineStatsCollector(stats, model_name, VllmFamilies(model_name) if vllm else None))

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)

    def refused_at_capacity(self, seconds: float) -> None:
        """A Generate call refused because the server was full, ``seconds`` after its handler began."""
        self._refused.inc()
        self.refusal_seconds.observe(seconds)

    def adapter_op(self, op: str, outcome: str, seconds: float) -> None:
        self.adapter_ops.labels(self.model_name, op, outcome).inc()
        self.adapter_op_seconds.labels(self.model_name, op).observe(seconds)

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Starts ``/metrics`` on a daemon thread; returns the server and its bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)


def _histogram(name: str, doc: str, buckets: tuple[float, ...], registry: CollectorRegistry, model: str) -> Any:
    return Histogram(name, doc, [MODEL], buckets=buckets, registry=registry).labels(model)


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
                self._observe("ttft", out.timings.time_to_first_token or 0.0)
            else:
                gap = (now - self._last_token_at) / len(out.new_token_ids)
                for _ in out.new_token_ids:
                    self._observe("itl", gap)
            self._last_token_at = now
        if out.finished:
            self._observe("e2e", out.timings.e2e_latency)
            self._observe("queue", out.timings.queue_time)
            self.finish(out.finish_reason or "stop")

    def _observe(self, which: str, seconds: float) -> None:
        getattr(self._m, which).observe(seconds)
        if self._m.vllm is not None:
            getattr(self._m.vllm, which).observe(seconds)

    def finish(self, outcome: str) -> None:
        """Counts the request once under ``outcome`` ("stop", "length", "abort", "cancelled", a status name)."""
        if not self._done:
            self._done = True
            self._m.requests.labels(self._m.model_name, outcome).inc()
            if self._m.vllm is not None:
                self._m.vllm.finished(outcome)
