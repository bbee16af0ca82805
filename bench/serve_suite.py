"""Serving benchmarks on a GPU: ``loraplex serve`` on random-weight models, driven by ``loraplex bench serve``.

Suites (bf16, random weights, one server each; base model and LoRA measured on the same server):
  sglang  SGLang's published LoRA shape (its PR #4115: 3,787 tok/s on an H100): Llama-2-7B shape, 4 random
          rank-16 adapters on all 7 projections, 50 requests, input U[1,1024], output U[1,128] (EOS ignored),
          all at once; then the same requests on the base model.
  qwen    Qwen3-0.6B shape, 64 adapters (64 copies of one random rank-16 adapter, loaded with --register),
          Zipf(1.0) popularity. A Poisson rate sweep (input U[128,384], output 128): the rate at which p99 TTFT
          crosses 1 s, and p50/p99 ITL at half that rate, base and LoRA; then that LoRA workload over gRPC and
          through the gateway (/v1/completions, token-id prompts), so the gateway's cost is a number.
Writes $OUT (or --out): serve_suite.json (every figure, with device, date and commands), serve_suite.md
(tables for BENCHMARKS.md), and per-run JSON and PNGs under serve/.

    bash bench/serve_suite.sh [--suite sglang|qwen|all]     # on the GPU machine
    bash bench/serve_suite.sh --smoke                       # tiny models on CPU: tests this script only
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.serve_models import write_model
from bench.serve_report import markdown, vs_rate_plot
from bench.serve_stack import Stack, start_gateway, start_serve
from loraplex.clients.bench import bench_serve, build_parser
from loraplex.clients.bench.metrics import crossing_rate

SGLANG_H100_TOK_S = 3787.0  # SGLang PR #4115, Llama-2-7B, 4 adapters, 50 requests, H100
TTFT_LIMIT_MS = 1000.0
PLOTS = importlib.util.find_spec("matplotlib") is not None  # without it: figures in JSON only
KEYS = ("num_sent", "completed", "failed", "errors", "duration", "request_throughput", "output_throughput",
        "total_token_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_itl_ms",
        "p99_itl_ms", "p50_e2el_ms", "p99_e2el_ms")


class Suite:
    def __init__(self, args: argparse.Namespace, out: Path, work: Path) -> None:
        self.args, self.out, self.work = args, out, work
        self.report: dict[str, Any] = {}  # written whole after each part (a run cut short keeps what ended)
        self.runs_dir = out / "serve"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"

    def write(self, root: Path, shape: str, n_adapters: int) -> tuple[Path, list[Path]]:
        """write_model; on CUDA in a child process, so this one never holds GPU memory the server needs."""
        if self.device == "cpu":
            return write_model(root, shape, "cpu", n_adapters)
        child = multiprocessing.get_context("spawn").Process(target=write_model, args=(root, shape, self.device,
                                                                                       n_adapters))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"writing the {shape} model failed (exit {child.exitcode})")
        return root / "model", [root / f"a{i}" for i in range(n_adapters)]

    def serve_flags(self, model: Path, max_loras: int) -> list[str]:
        flags = ["--model", str(model), "--adapter-roots", str(model.parent),  # the written adapters beside it
                 "--max-loras", str(max_loras), "--max-lora-rank", "16",
                 "--max-cpu-loras", str(max(64, max_loras)), "--grace-period", "5"]
        if self.device == "cpu":
            return [*flags, "--device", "cpu", "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 * 2**20)]
        return [*flags, "--dtype", "bfloat16", "--max-model-len", "2048"]

    def bench(self, label: str, endpoint: str, flags: list[str], plot: bool = False) -> dict[str, Any]:
        """One ``loraplex bench serve`` run (in this process); its result, with the command that repeats it."""
        argv = ["serve", "--endpoint", endpoint, "--label", label, "--save-result", "--result-dir",
                str(self.runs_dir), "--result-filename", f"{label}.json", "--disable-tqdm", *flags,
                *(["--plot"] if plot and PLOTS else [])]
        result = asyncio.run(bench_serve(build_parser().parse_args(argv)))
        result["command"] = "loraplex bench " + shlex.join(argv)
        Path(result["result_path"]).write_text(json.dumps(result, indent=1))
        return result

    # ---- suites --------------------------------------------------------------------------------

    def sglang(self) -> dict[str, Any]:
        smoke = self.args.smoke
        model, adapters = self.write(self.work / "llama", "tiny-llama" if smoke else "llama2-7b", 4)
        preload = [f for i, a in enumerate(adapters) for f in ("--preload", f"lora{i}={a}")]
        stack = start_serve([*self.serve_flags(model, 4), *preload], self.out, "serve-llama")
        try:
            n, half_in, half_out = ("8", "16", "4") if smoke else ("50", "512", "64")
            workload = ["--num-prompts", n, "--random-input-len", half_in, "--random-output-len", half_out,
                        "--random-range-ratio", "1.0", "--ignore-eos", "--request-rate", "inf", "--seed", "0",
                        "--num-warmups", "4"]
            endpoint = f"grpc://{stack.target}"
            lora = self.bench("sglang-lora4", endpoint, [*workload, "--adapters", "4"], plot=True)
            base = self.bench("sglang-base", endpoint, workload, plot=True)
        finally:
            stack.stop()
        out = {"lora": pick(lora), "base": pick(base), "server": lora["server"], "commands":
               [lora["command"], base["command"]], "reference_sglang_h100_output_tok_s": SGLANG_H100_TOK_S}
        out["lora_vs_base_output_tok_s"] = ratio(out["lora"]["output_throughput"], out["base"]["output_throughput"])
        return out

    def qwen(self) -> dict[str, Any]:
        smoke = self.args.smoke
        model, adapters = self.write(self.work / "qwen", "tiny-qwen3" if smoke else "qwen3-0.6b", 1)
        n_adapters = 4 if smoke else 64
        stack = start_serve(self.serve_flags(model, n_adapters), self.out, "serve-qwen")
        try:
            start_gateway(stack, self.out)
            return self._qwen_runs(stack, adapters[0], n_adapters)
        finally:
            stack.stop()

    def _qwen_runs(self, stack: Stack, source: Path, n_adapters: int) -> dict[str, Any]:
        grpc_url = f"grpc://{stack.target}"
        lora = ["--adapter-distribution", "zipf", "--zipf-alpha", "1.0"]
        self.bench("qwen-register", grpc_url, [*self.qwen_workload(1.0, 2), "--register", str(n_adapters),
                                               "--source", str(source), "--register-prefix", "z", *lora])
        lora += ["--adapter-names", ",".join(f"z{i}" for i in range(n_adapters))]
        out: dict[str, Any] = {"adapters": n_adapters}
        self.report["qwen"] = out
        for name, mix in (("base", []), ("lora", lora)):
            out[name] = self.sweep(name, grpc_url, mix)
            self.flush()
        half = out["lora"]["half_rate"]["rate"]
        workload = [*self.qwen_workload(half), *lora]
        via_grpc = self.bench("qwen-lora-grpc", grpc_url, workload, plot=True)
        via_http = self.bench("qwen-lora-gateway", stack.url, workload, plot=True)
        out["gateway"] = {"rate": half, "grpc": pick(via_grpc), "gateway": pick(via_http),
                          "commands": [via_grpc["command"], via_http["command"]]}
        g = out["gateway"]
        g["gateway_vs_grpc_output_tok_s"] = ratio(g["gateway"]["output_throughput"], g["grpc"]["output_throughput"])
        g["gateway_extra_p50_ttft_ms"] = g["gateway"]["p50_ttft_ms"] - g["grpc"]["p50_ttft_ms"]
        g["gateway_extra_p50_itl_ms"] = g["gateway"]["p50_itl_ms"] - g["grpc"]["p50_itl_ms"]
        return out

    def flush(self) -> None:
        (self.out / "serve_suite.json").write_text(json.dumps(self.report, indent=1))

    def qwen_workload(self, rate: float, n: int | None = None) -> list[str]:
        seconds = 3 if self.args.smoke else self.args.seconds_per_rate
        count = n or int(min(max(rate * seconds, 6 if self.args.smoke else 32), 400))
        lengths = ["16", "4"] if self.args.smoke else ["256", "128"]
        return ["--num-prompts", str(count), "--random-input-len", lengths[0], "--random-output-len", lengths[1],
                "--random-range-ratio", "0.5", "--random-length-distribution", "uniform", "--ignore-eos",
                "--request-rate", f"{rate:g}", "--seed", "0", "--num-warmups", "4",
                "--duration", str(2 * seconds)]

    def sweep(self, name: str, endpoint: str, mix: list[str]) -> dict[str, Any]:
        """Rates in increasing order until p99 TTFT is past twice the limit; the crossing; ITL at half of it."""
        points, results = [], []
        for rate in [float(r) for r in self.args.rates.split(",")]:
            result = self.bench(f"qwen-{name}-rate{rate:g}", endpoint, [*self.qwen_workload(rate), *mix])
            results.append(result)
            points.append((rate, result["runs"][0]["summary"]["p99_ttft_ms"]))
            if points[-1][1] > 2 * TTFT_LIMIT_MS:
                break
        cross = crossing_rate(points, TTFT_LIMIT_MS)
        half = (cross if cross is not None else points[-1][0]) / 2
        at_half = self.bench(f"qwen-{name}-half", endpoint, [*self.qwen_workload(half), *mix], plot=True)
        png = vs_rate_plot(results, self.runs_dir / f"qwen-{name}-sweep") if PLOTS else []
        return {"rates": [p[0] for p in points], "p99_ttft_ms": [p[1] for p in points],
                "output_throughput": [r["runs"][0]["summary"]["output_throughput"] for r in results],
                "p99_ttft_crosses_1s_at": cross, "half_rate": {"rate": half, **pick(at_half)},
                "plots": png, "commands": [r["command"] for r in results] + [at_half["command"]]}


def pick(result: dict[str, Any]) -> dict[str, Any]:
    summary = result["runs"][0]["summary"]
    return {k: summary[k] for k in KEYS}


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU, a few requests")
    ap.add_argument("--suite", choices=["sglang", "qwen", "all"], default="all")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--rates", default="2,4,8,12,16,24,32,48,64", help="Poisson rates of the sweep (req/s)")
    ap.add_argument("--seconds-per-rate", type=float, default=10.0, help="requests per rate = rate x this")
    args = ap.parse_args()
    if args.smoke:
        args.rates = "2,4"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        suite = Suite(args, args.out, Path(tmp))
        report = suite.report
        report.update({
            "device": suite.device, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "smoke": args.smoke,
            "command": "bash bench/serve_suite.sh " + shlex.join(sys.argv[1:]),
        })
        for name in ("sglang", "qwen"):
            if args.suite in (name, "all"):
                report[name] = getattr(suite, name)()
                suite.flush()
        if suite.device == "cuda":  # only now: a CUDA context here would have taken memory from the servers
            report["device"] = torch.cuda.get_device_name(0)
        report["plots"] = PLOTS
        (args.out / "serve_suite.json").write_text(json.dumps(report, indent=1))
    (args.out / "serve_suite.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
