"""The ``vllm:*`` metric families, under vLLM's names, types, labels and units, so that the
Gateway API Inference Extension's endpoint picker, llm-d's scorers and AIBrix can read a
loraplex server as they read vLLM.

- queue and KV: ``vllm:num_requests_running`` / ``_waiting``, ``vllm:kv_cache_usage_perc``
  (a 0-1 fraction, as vLLM's) and its older name ``vllm:gpu_cache_usage_perc``;
- LoRA affinity: ``vllm:lora_requests_info`` (labels ``max_lora``, ``running_lora_adapters``,
  ``waiting_lora_adapters``: comma-separated names; value: the wall-clock time of the scrape,
  since routers keep the series with the largest value);
- adapter residency, as llm-d's LoRA load-state scorer reads it:
  ``vllm:lora_adapter_loaded{adapter_name, level="gpu"|"cpu", pinned, rank}`` (1 per loaded
  adapter, gone when evicted or unloaded), ``vllm:num_gpu_loaded_lora_adapters``,
  ``vllm:num_cpu_loaded_lora_adapters``, ``vllm:max_gpu_lora_adapters`` and the
  ``vllm:lora_adapter_load_seconds`` histogram;
- tokens, preemptions, prefix cache (counters) and the request histograms (TTFT,
  inter-token latency, end-to-end, queue time) and ``vllm:request_success_total``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from loraplex.backend.engine.stats import EngineStats

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MODEL = "model_name"
FINISHED_REASONS = ("stop", "length", "abort")  # vLLM's; other outcomes (errors, cancels) are not successes

_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches.", "num_running"),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_usage"),
    ("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage (older name of "
                                  "vllm:kv_cache_usage_perc).", "kv_usage"),
    ("vllm:max_gpu_lora_adapters", "GPU LoRA adapter slots (max_loras).", "lora_slots_total"),
)
_COUNTERS = (
    ("vllm:prompt_tokens", "Number of prefill tokens processed.", "prompt_tokens"),
    ("vllm:generation_tokens", "Number of generation tokens processed.", "generation_tokens"),
    ("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", "preemptions"),
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
     "prefix_cache_queries"),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits"),
)


class VllmRequestMetrics:
    """The request-level ``vllm:*`` histograms and outcomes, observed beside the ``loraplex_*`` ones."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, [MODEL], buckets=buckets, registry=registry).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              LATENCY_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [MODEL, "finished_reason"], registry=registry)
        self._success = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}

    def finished(self, outcome: str) -> None:
        if outcome in self._success:
            self._success[outcome].inc()


class VllmFamilies:
    """The engine-side ``vllm:*`` families, built from one ``EngineStats`` per scrape."""

    def __init__(self, model_name: str) -> None:
        self._model = model_name
        self._loads = _LoadHistogram()

    def collect(self, s: EngineStats) -> Iterator[Metric]:
        m = self._model
        for name, doc, attr in _GAUGES:
            yield _one(GaugeMetricFamily(name, doc, labels=[MODEL]), m, getattr(s, attr))
        for name, doc, attr in _COUNTERS:
            yield _one(CounterMetricFamily(name, doc, labels=[MODEL]), m, getattr(s, attr))
        yield self._requests_info(s)
        yield from self._residency(s)
        yield self._loads.family(s, m)

    def _requests_info(self, s: EngineStats) -> Metric:
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=[MODEL, "max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([self._model, str(s.lora_slots_total), ",".join(s.running_adapter_names),
                         ",".join(s.waiting_adapter_names)], time.time())
        return info

    def _residency(self, s: EngineStats) -> Iterator[Metric]:
        loaded = GaugeMetricFamily("vllm:lora_adapter_loaded", "LoRA adapters loaded, by cache level (1 while "
                                   "loaded).", labels=[MODEL, "adapter_name", "level", "pinned", "rank"])
        per_level = {"gpu": 0, "cpu": 0}
        for a in s.adapter_residency:
            if a.level in per_level:
                per_level[a.level] += 1
                loaded.add_metric([self._model, a.name, a.level, str(a.pinned).lower(), str(a.rank)], 1.0)
        yield loaded
        for level, count in per_level.items():
            yield _one(GaugeMetricFamily(f"vllm:num_{level}_loaded_lora_adapters",
                                         f"Number of LoRA adapters loaded in {level.upper()} memory.",
                                         labels=[MODEL]), self._model, count)


def _one(family: Any, model: str, value: float) -> Metric:
    family.add_metric([model], float(value))
    return family


class _LoadHistogram:
    """``vllm:lora_adapter_load_seconds`` from the engine's source-load counters.

    The engine counts loads and their total seconds; each scrape puts the new loads into the
    buckets at their mean duration (exact when at most one load happened since the last scrape).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen = (0, 0.0)
        self._buckets = [0] * (len(LOAD_BUCKETS) + 1)

    def family(self, s: EngineStats, model: str) -> Metric:
        with self._lock:
            loads, seconds = s.adapter_source_loads - self._seen[0], s.adapter_source_load_seconds - self._seen[1]
            if loads > 0:
                self._buckets[bisect.bisect_left(LOAD_BUCKETS, seconds / loads)] += loads
                self._seen = (s.adapter_source_loads, s.adapter_source_load_seconds)
            cumulative, total = [], 0
            for bound, count in zip([*LOAD_BUCKETS, float("inf")], self._buckets, strict=True):
                total += count
                cumulative.append((_bound(bound), float(total)))
            family = HistogramMetricFamily("vllm:lora_adapter_load_seconds", "Time to load a LoRA adapter's "
                                           "weights, in seconds.", labels=[MODEL])
            family.add_metric([model], cumulative, sum_value=self._seen[1])
            return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
