"""The results as people read them: a table on stdout, JSON on disk, PNG plots (matplotlib, optional)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraplex.clients.bench.errors import BenchError
from loraplex.clients.bench.metrics import LATENCY_METRICS, p_word, percentile

_TITLES = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
           "itl": "Inter-token latency", "e2el": "End-to-end latency"}


def table(run: dict[str, Any], percentiles: Sequence[float]) -> str:
    """``vllm bench serve``'s result table for one run, plus goodput and errors by code."""
    s = run["summary"]
    rows: list[tuple[str, Any]] = [
        ("Endpoint", run["endpoint"]), ("Adapters", _adapters_line(run)),
        ("Request rate (req/s)", run["request_rate"]), ("Max concurrency", run["max_concurrency"] or "-"),
        ("Requests sent", s["num_sent"]), ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]), ("Benchmark duration (s)", s["duration"]),
        ("Total input tokens", s["total_input_tokens"]), ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", s["request_throughput"]),
        ("Output token throughput (tok/s)", s["output_throughput"]),
        ("Total token throughput (tok/s)", s["total_token_throughput"]),
    ]
    if s["request_goodput"] is not None:
        rows.append(("Request goodput (req/s)", s["request_goodput"]))
    lines = [f"{' Serving Benchmark Result ':=^60}"] + [_row(k, v) for k, v in rows]
    for name in LATENCY_METRICS:
        lines.append(f"{' ' + _TITLES[name] + ' ':-^60}")
        lines += [_row(f"Mean {name.upper()} (ms)", s[f"mean_{name}_ms"]),
                  _row(f"Median {name.upper()} (ms)", s[f"median_{name}_ms"])]
        lines += [_row(f"P{p_word(p)} {name.upper()} (ms)", s[f"p{p_word(p)}_{name}_ms"]) for p in percentiles]
    if s["errors"]:
        lines.append(f"{' Errors by code ':-^60}")
        lines += [_row(code, count) for code, count in sorted(s["errors"].items())]
    lines.append("=" * 60)
    return "\n".join(lines)


def _adapters_line(run: dict[str, Any]) -> str:
    names = run["adapters"]
    if not names:
        return "base model"
    return f"{len(names)} ({run['adapter_distribution']})"


def _row(key: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{key + ':':<42}{text:>18}"


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def json_safe(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib: pip install 'loraplex[bench]'") from exc
    return plt


def plot_cdfs(runs: Sequence[dict[str, Any]], latencies: Sequence[dict[str, list[float]]], path: Path) -> Path:
    """One panel per latency metric, one CDF line per run (per rate in a sweep)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, name in zip(axes.flat, LATENCY_METRICS, strict=True):
        for run, values in zip(runs, latencies, strict=True):
            ms = sorted(v * 1000 for v in values[name])
            if ms:
                ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=f"{run['request_rate']} req/s")
        ax.set_title(_TITLES[name])
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if name != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{runs[0]['endpoint']}  ·  {_adapters_line(runs[0])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_vs_rate(runs: Sequence[dict[str, Any]], latencies: Sequence[dict[str, list[float]]], metric: str,
                 path: Path) -> Path:
    """p50 and p99 of ``metric`` against the offered request rate (finite rates of a sweep)."""
    plt = _pyplot()
    points = [(float(r["request_rate"]), lat[metric]) for r, lat in zip(runs, latencies, strict=True)
              if r["request_rate"] != "inf"]
    points.sort(key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in (50, 99):
        ax.plot([x for x, _ in points], [percentile(v, p) * 1000 for _, v in points], marker="o", label=f"p{p}")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(f"{metric.upper()} (ms)")
    ax.set_title(f"{_TITLES[metric]} vs request rate  ·  {_adapters_line(runs[0])}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
