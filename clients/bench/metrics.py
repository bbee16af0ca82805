"""The summary of a run, with ``vllm bench serve``'s definitions and key names.

- TTFT: send → first streamed chunk carrying output (per successful request).
- TPOT: (e2e latency − TTFT) / (output tokens − 1), for requests with more than one output token.
- ITL: the gaps between successive streamed chunks, pooled over all successful requests
  (a chunk carrying several tokens is one gap, as in vLLM).
- E2EL: send → last chunk.
- Throughputs divide by the run's duration (first send → last answer); failed requests count
  in neither tokens nor latencies.
- Goodput: successful requests per second that meet every SLO given (TTFT, TPOT, E2EL in ms;
  a request with one output token has TPOT 0 for this test, as in vLLM).
Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from loraplex.clients.bench.errors import BenchError
from loraplex.clients.bench.records import RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft", "tpot", "e2el")


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * p / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def parse_slo(text: str | None) -> dict[str, float]:
    """``ttft=500,tpot=50`` (milliseconds) → {"ttft": 500.0, "tpot": 50.0}."""
    slo: dict[str, float] = {}
    for item in (text or "").replace(" ", ",").split(","):
        if not item:
            continue
        key, sep, value = item.replace(":", "=").partition("=")
        if not sep or key not in SLO_KEYS:
            raise BenchError(f"--slo: {item!r} is not one of {', '.join(k + '=MS' for k in SLO_KEYS)}")
        try:
            slo[key] = float(value)
        except ValueError:
            raise BenchError(f"--slo: {item!r}: {value!r} is not a number of milliseconds") from None
        if slo[key] <= 0:
            raise BenchError(f"--slo: {item!r}: must be > 0")
    return slo


def per_request_latencies(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Seconds, successful requests only: ttft, tpot (output > 1), itl (pooled), e2el."""
    ok = [r for r in records if r.success]
    return {
        "ttft": [r.ttft for r in ok],
        "tpot": [_tpot(r) for r in ok if r.output_len > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }


def _tpot(r: RequestRecord) -> float:
    return (r.latency - r.ttft) / (r.output_len - 1) if r.output_len > 1 else 0.0


def _is_good(r: RequestRecord, slo: dict[str, float]) -> bool:
    measured = {"ttft": r.ttft, "tpot": _tpot(r), "e2el": r.latency}
    return all(measured[key] * 1000 <= limit for key, limit in slo.items())


def summarize(records: Sequence[RequestRecord], duration: float, slo: dict[str, float],
              percentiles: Sequence[float]) -> dict[str, Any]:
    """Counts, throughputs, latency statistics in ms, goodput and errors by code."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    dur = max(duration, 1e-9)
    good = sum(_is_good(r, slo) for r in ok) if slo else len(ok)
    out: dict[str, Any] = {
        "duration": duration, "num_sent": len(records), "completed": len(ok), "failed": len(failed),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur, "request_goodput": good / dur if slo else None,
        "output_throughput": total_out / dur, "total_token_throughput": (total_in + total_out) / dur,
        "errors": dict(Counter(r.error_code for r in failed)),
        "error_examples": {r.error_code: r.error for r in failed},
    }
    for name, values in per_request_latencies(records).items():
        ms = [v * 1000 for v in values]
        out[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        out[f"median_{name}_ms"] = statistics.median(ms) if ms else 0.0
        out[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else 0.0
        for p in percentiles:
            out[f"p{p_word(p)}_{name}_ms"] = percentile(ms, p)
    return out


def crossing_rate(points: Sequence[tuple[float, float]], threshold: float) -> float | None:
    """The rate where a metric first reaches ``threshold``, interpolated linearly between the sweep's
    (rate, value) points in increasing rate; None when it never does (or at the first point already)."""
    finite = sorted((r, v) for r, v in points if math.isfinite(r))
    for (r0, v0), (r1, v1) in zip(finite, finite[1:], strict=False):
        if v0 < threshold <= v1:
            return r0 + (r1 - r0) * (threshold - v0) / (v1 - v0)
    return None
