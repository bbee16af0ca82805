"""serve_suite.py's tables (markdown for BENCHMARKS.md) and its TTFT/ITL-against-rate plots."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loraplex.clients.bench import report
from loraplex.clients.bench.metrics import per_request_latencies
from loraplex.clients.bench.records import RequestRecord


def vs_rate_plot(results: list[dict[str, Any]], stem: Path) -> list[str]:
    """p50/p99 TTFT and ITL against the offered rate, over the sweep's single-rate runs; the PNG paths."""
    runs = [r["runs"][0] for r in results]
    latencies = [per_request_latencies([RequestRecord(**rec) for rec in run["requests"]]) for run in runs]
    if len(runs) < 2:
        return []
    return [str(report.plot_vs_rate(runs, latencies, m, stem.with_name(f"{stem.name}-{m}_vs_rate.png")))
            for m in ("ttft", "itl")]


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rep: dict[str, Any]) -> str:
    lines = [f"Device: {rep['device']} · date {rep['date']} · torch {rep['torch']} · `{rep['command']}`"
             + (" · SMOKE RUN (tiny models on CPU: not a measurement)" if rep.get("smoke") else ""), ""]
    if "sglang" in rep:
        lines += _sglang(rep["sglang"])
    if "qwen" in rep:
        lines += _sweep(rep["qwen"]) + _gateway(rep["qwen"]["gateway"])
    return "\n".join(lines) + "\n"


def _sglang(s: dict[str, Any]) -> list[str]:
    ref = s["reference_sglang_h100_output_tok_s"]
    rows = ["#### SGLang's LoRA shape: Llama-2-7B shape, 4 adapters, 50 requests, in U[1,1024], out U[1,128], all at once",
            "", "| case | output tok/s | total tok/s | p50 TTFT ms | p99 TTFT ms | p50 ITL ms | p99 ITL ms | failed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("lora", "base"):
        r = s[name]
        rows.append(f"| {name} | {_f(r['output_throughput'])} | {_f(r['total_token_throughput'])} | "
                    f"{_f(r['p50_ttft_ms'])} | {_f(r['p99_ttft_ms'])} | {_f(r['p50_itl_ms'], 2)} | "
                    f"{_f(r['p99_itl_ms'], 2)} | {r['failed']} |")
    rows += ["", f"SGLang (PR #4115, H100): {ref:,.0f} tok/s · loraplex LoRA / SGLang: "
             f"{_f(s['lora']['output_throughput'] / ref, 2)} · LoRA / base: {_f(s['lora_vs_base_output_tok_s'], 2)}",
             "", *[f"`{c}`  " for c in s["commands"]], ""]
    return rows


def _sweep(q: dict[str, Any]) -> list[str]:
    rows = [f"#### Qwen3-0.6B shape, Poisson sweep, {q['adapters']} adapters Zipf(1.0) vs base", "",
            "| case | rates swept (req/s) | p99 TTFT crosses 1 s at (req/s) | half rate | p50 ITL ms | p99 ITL ms "
            "| output tok/s at half rate |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("base", "lora"):
        s, h = q[name], q[name]["half_rate"]
        rows.append(f"| {name} | {', '.join(f'{r:g}' for r in s['rates'])} | {_f(s['p99_ttft_crosses_1s_at'])} | "
                    f"{_f(h['rate'])} | {_f(h['p50_itl_ms'], 2)} | {_f(h['p99_itl_ms'], 2)} | "
                    f"{_f(h['output_throughput'])} |")
    return [*rows, ""]


def _gateway(g: dict[str, Any]) -> list[str]:
    rows = [f"#### The same LoRA workload at {g['rate']:.1f} req/s: gRPC vs the gateway", "",
            "| path | output tok/s | p50 TTFT ms | p99 TTFT ms | p50 ITL ms | p99 ITL ms | failed |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("grpc", "gateway"):
        r = g[name]
        rows.append(f"| {name} | {_f(r['output_throughput'])} | {_f(r['p50_ttft_ms'])} | {_f(r['p99_ttft_ms'])} | "
                    f"{_f(r['p50_itl_ms'], 2)} | {_f(r['p99_itl_ms'], 2)} | {r['failed']} |")
    rows += ["", f"gateway / gRPC output tok/s: {_f(g['gateway_vs_grpc_output_tok_s'], 3)} · extra p50 TTFT: "
             f"{_f(g['gateway_extra_p50_ttft_ms'], 2)} ms · extra p50 ITL: {_f(g['gateway_extra_p50_itl_ms'], 3)} ms", ""]
    return rows


def summaries_from_log(text: str) -> dict[str, dict[str, str]]:
    """Every ``loraplex bench serve`` summary printed in a log (a run cut before its JSON was written
    still printed its table): ``{result file name: {label: value}}``, values as printed."""
    out: dict[str, dict[str, str]] = {}
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("result: "):
            out[Path(line[len("result: "):].strip()).name] = rows
            rows = {}
        elif (m := re.match(r"([^:=-][^:]*):\s+(\S.*)$", line)) and m.group(1) != "plots":
            rows[" ".join(m.group(1).split())] = m.group(2).strip()
    return out


def sweep_plot(summaries: dict[str, dict[str, str]], path: Path) -> Path:
    """TTFT and ITL (p50, p99) against the offered rate for the base and LoRA sweeps of the Qwen suite,
    from printed summaries (``summaries_from_log``); one PNG of two panels, log-scale latency."""
    plt = report._pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mix, style in (("base", "-"), ("lora", "--")):
        runs = sorted((float(v["Request rate (req/s)"]), v) for k, v in summaries.items()
                      if re.fullmatch(rf"qwen-{mix}-rate[\d.]+\.json", k))
        for ax, metric in zip(axes, ("TTFT", "ITL"), strict=True):
            for q in ("P50", "P99"):
                ax.plot([r for r, _ in runs], [float(v[f"{q} {metric} (ms)"]) for _, v in runs], style, marker="o",
                        label=f"{mix} {q.lower()}")
    for ax, metric in zip(axes, ("TTFT", "ITL"), strict=True):
        ax.set_xlabel("offered request rate (req/s, Poisson)")
        ax.set_ylabel(f"{metric} (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].axhline(1000, color="grey", lw=0.8)
    axes[0].set_title("time to first token (the 1 s line: the sweep's crossing)")
    axes[1].set_title("inter-token latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":  # python bench/serve_report.py LOG OUT.json [SWEEP.png]: a log's summaries as JSON
    import json
    import sys

    summaries = summaries_from_log(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps({"source": sys.argv[1], "runs": summaries}, indent=1))
    if len(sys.argv) > 3:
        sweep_plot(summaries, Path(sys.argv[3]))
