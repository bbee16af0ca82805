"""One benchmark invocation: build the workload, warm up, run each rate, then report, save and plot."""

from __future__ import annotations

import argparse
import math
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraplex.clients.bench import report
from loraplex.clients.bench.errors import BenchError
from loraplex.clients.bench.grpc_endpoint import SamplingChoice, ServerFacts
from loraplex.clients.bench.metrics import crossing_rate, per_request_latencies, percentile, summarize
from loraplex.clients.bench.runner import Endpoint, Progress, RunLimits, rate_label, run_requests
from loraplex.clients.bench.workload import (
    BenchRequest,
    LengthSpec,
    arrival_times,
    assign_adapters,
    read_jsonl,
    synthetic_prompts,
    synthetic_text,
)


def build_requests(args: argparse.Namespace, facts: ServerFacts, names: Sequence[str],
                   rng: random.Random) -> list[BenchRequest]:
    """The workload: prompts (random ids, text for chat, or JSONL), output budgets and adapters."""
    n = args.num_prompts
    if args.dataset_name == "jsonl":
        rows = read_jsonl(args.dataset_path, n)
        n = len(rows)
        prompts, budgets = [p for p, _ in rows], [m if m is not None else args.random_output_len for _, m in rows]
    else:
        budgets = LengthSpec(args.random_output_len, args.random_range_ratio, args.random_length_distribution
                             ).draw(n, rng)
        input_lens = LengthSpec(args.random_input_len, args.random_range_ratio, args.random_length_distribution
                                ).draw(n, rng)
        input_lens = [_fit(i, o, facts.max_model_len) for i, o in zip(input_lens, budgets, strict=True)]
        if args.api == "chat":
            prompts = [synthetic_text(length, rng) for length in input_lens]
        else:
            avoid = {facts.eos_token_id} if facts.eos_token_id is not None else set()
            prompts = list(synthetic_prompts(n, input_lens, facts.vocab_size, avoid, rng))
    if args.api == "chat" and any(not isinstance(p, str) for p in prompts):
        raise BenchError("--api chat needs text prompts (the JSONL file has token ids)")
    adapters = assign_adapters(n, names, args.adapter_distribution, args.zipf_alpha, rng)
    return [BenchRequest(index=i, prompt=p, prompt_len=len(p) if isinstance(p, list) else 0, max_tokens=budget,
                         adapter=adapter)
            for i, (p, budget, adapter) in enumerate(zip(prompts, budgets, adapters, strict=True))]


def _fit(input_len: int, output_len: int, max_model_len: int) -> int:
    """A prompt short enough that prompt + output fits the server's context (when it says how long)."""
    if max_model_len and input_len + output_len > max_model_len:
        return max(1, max_model_len - output_len)
    return input_len


async def run_suite(endpoint: Endpoint, facts: ServerFacts, names: list[str], sampling: SamplingChoice,
                    rates: list[float], percentiles: list[float], slo: dict[str, float],
                    args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    requests = build_requests(args, facts, names, rng)
    limits = RunLimits(max_concurrency=args.max_concurrency, duration=args.duration)
    if args.num_warmups:
        warm = requests[: args.num_warmups]
        await run_requests(endpoint, warm, [0.0] * len(warm), sampling, RunLimits(args.max_concurrency),
                           Progress(len(warm), "warmup", False))
    runs, latencies = [], []
    for rate in rates:
        times = arrival_times(len(requests), rate, args.burstiness, random.Random(args.seed + 1))
        progress = Progress(len(requests), f"rate {rate_label(rate)}", not args.disable_tqdm)
        records, duration = await run_requests(endpoint, requests, times, sampling, limits, progress)
        progress.close()
        run = {"endpoint": args.endpoint, "api": args.api if endpoint_kind(args) == "http" else "grpc",
               "request_rate": report.json_safe(rate), "burstiness": args.burstiness,
               "max_concurrency": args.max_concurrency, "adapters": names,
               "adapter_distribution": args.adapter_distribution if names else "base",
               "summary": summarize(records, duration, slo, percentiles),
               "requests": [r.to_json() for r in records]}
        print(report.table(run, percentiles))
        runs.append(run)
        latencies.append(per_request_latencies(records))
    result = _result(args, facts, runs, latencies, slo)
    _save(args, result, runs, latencies)
    return result


def endpoint_kind(args: argparse.Namespace) -> str:
    return "http" if args.endpoint.startswith(("http://", "https://")) else "grpc"


def _result(args: argparse.Namespace, facts: ServerFacts, runs: list[dict[str, Any]],
            latencies: list[dict[str, list[float]]], slo: dict[str, float]) -> dict[str, Any]:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("api_key", "func")}
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "label": args.label,
                              "server": vars(facts), "config": config, "slo_ms": slo, "runs": runs}
    if len(runs) > 1:
        result["sweep"] = sweep_summary(runs, latencies, slo)
    return result


def sweep_summary(runs: Sequence[dict[str, Any]], latencies: Sequence[dict[str, list[float]]],
                  slo: dict[str, float]) -> dict[str, Any]:
    """Per rate p50/p99 TTFT and ITL; with a TTFT SLO, the rate where p99 TTFT crosses it."""
    rates = [math.inf if r["request_rate"] == "inf" else float(r["request_rate"]) for r in runs]
    table = {f"p{p}_{m}_ms": [percentile(lat[m], p) * 1000 for lat in latencies]
             for m in ("ttft", "itl") for p in (50, 99)}
    out: dict[str, Any] = {"rates": [report.json_safe(r) for r in rates], **table,
                           "output_throughput": [r["summary"]["output_throughput"] for r in runs]}
    if "ttft" in slo:
        out["p99_ttft_crossing_rate"] = crossing_rate(list(zip(rates, table["p99_ttft_ms"], strict=True)),
                                                      slo["ttft"])
    return out


def _save(args: argparse.Namespace, result: dict[str, Any], runs: list[dict[str, Any]],
          latencies: list[dict[str, list[float]]]) -> None:
    stem = Path(args.result_filename).stem if args.result_filename else \
        re.sub(r"[^\w.-]+", "_", f"{args.label or endpoint_kind(args)}-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir: Path = args.result_dir
    if args.plot:
        out_dir.mkdir(parents=True, exist_ok=True)
        pngs = [report.plot_cdfs(runs, latencies, out_dir / f"{stem}-latency_cdf.png")]
        if sum(r["request_rate"] != "inf" for r in runs) > 1:
            pngs += [report.plot_vs_rate(runs, latencies, m, out_dir / f"{stem}-{m}_vs_rate.png")
                     for m in ("ttft", "itl")]
        result["plots"] = [str(p) for p in pngs]
        print("plots: " + " ".join(str(p) for p in pngs))
    if args.save_result:
        path = report.write_json(result, out_dir / f"{stem}.json")
        result["result_path"] = str(path)
        print(f"result: {path}")
