"""Per-decoder-layer LoRA cost of the Triton SGMV/BGMV kernels (bf16, rank 16).

One layer = 4 add_lora calls (fused qkv, o, fused gate_up, down) = all 7 projections.
For 1 / 8 / 32 / 64 distinct adapters (64 slots allocated) at 64 decode tokens (one per
request, round-robin over adapters) and 256 prefill tokens (one segment per adapter), against
  - the float32 torch reference path on the same GPU (one layer, L2 flushed, eager),
  - the byte floor: x read + y read and written + each distinct adapter's A/B read once,
    over the device copy bandwidth measured in this run (bytes read + written).
Kernel time is one CUDA-graph replay across every layer of the model (distinct weights and
activations per layer, so nothing stays in L2), divided by the layer count.

    python bench/lora_kernels.py                 # GPU; writes $OUT/lora_kernels.json if OUT is set
    python bench/lora_kernels.py --cpu-smoke     # tiny shapes on CPU, Triton in its interpreter
    python bench/lora_kernels.py --sweep         # tuning: split-K variants x paths, kernel profile
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

SHAPES = {  # hidden, intermediate, q, kv, layers
    "llama3-8b": (4096, 14336, 4096, 1024, 32),
    "qwen3-0.6b": (1024, 3072, 2048, 1024, 28),
}
SMOKE_SHAPES = {"tiny": (64, 96, 64, 32, 1)}
RANK, SLOTS = 16, 64


@dataclass
class Row:
    model: str
    tokens: int
    adapters: int
    path: str  # what add_lora's auto dispatch picks
    graph_us: float  # auto path, CUDA graph, per layer
    sgmv_us: float
    bgmv_us: float
    eager_us: float  # auto path, eager, one layer, L2 flushed
    torch_us: float
    floor_us: float
    pct_of_floor: float  # floor / graph time
    speedup_vs_torch: float


def layer_dims(hidden: int, inter: int, q: int, kv: int) -> list[tuple[int, list[int]]]:
    """(H_in, out_slices) of qkv, o, gate_up, down."""
    return [(hidden, [q, kv, kv]), (q, [hidden]), (hidden, [inter, inter]), (inter, [hidden])]


def make_layer(dims: list[tuple[int, list[int]]], tokens: int, device: str) -> list[dict]:
    calls = []
    for h_in, outs in dims:
        n = len(outs)
        calls.append(dict(
            x=torch.randn(tokens, h_in, device=device, dtype=torch.bfloat16),
            y=torch.randn(tokens, sum(outs), device=device, dtype=torch.bfloat16),
            lora_a=(torch.randn(SLOTS, n * RANK, h_in, device=device) / h_in**0.5).bfloat16(),
            lora_b=(torch.randn(SLOTS, sum(outs), RANK, device=device) / RANK**0.5).bfloat16(),
            scales=torch.full((SLOTS,), 2.0, device=device),
            out_slices=outs,
        ))
    set_bufs(calls, None)
    return calls


def set_bufs(calls: list[dict], partials: int | None) -> None:
    """Preallocated shrink scratch per call: add_lora's default (None), [T, N] (0) or [P, T, N] partials."""
    from loraplex.kernels.lora import lora_buffer

    for c in calls:
        c["buf"] = lora_buffer(c["x"].shape[0], c["lora_a"], partials)


def batch_slots(tokens: int, adapters: int, prefill: bool) -> list[int]:
    if prefill:
        return [t * adapters // tokens for t in range(tokens)]
    return [t % adapters for t in range(tokens)]


def layer_fn(calls: list[dict], meta, backend: str, kind: str) -> Callable[[], None]:
    from loraplex.kernels.lora import add_lora

    def run() -> None:
        for c in calls:
            add_lora(c["y"], c["x"], c["lora_a"], c["lora_b"], c["scales"], c["out_slices"], meta,
                     buf=c["buf"], backend=backend, kind=kind)
    return run


def floor_bytes(calls: list[dict], adapters: int) -> int:
    total = 0
    for c in calls:
        total += c["x"].numel() * 2 + 2 * c["y"].numel() * 2
        total += adapters * (c["lora_a"][0].numel() + c["lora_b"][0].numel()) * 2
    return total


class Timer:
    """Median microseconds of fn; on CUDA with events and an L2 flush before each rep."""

    def __init__(self, device: str, reps: int):
        self.cuda, self.reps = device == "cuda", reps
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if self.cuda else None

    def __call__(self, fn: Callable[[], object], flush: bool = True) -> float:
        fn()
        self._sync()
        times = []
        for _ in range(self.reps):
            if flush and self.flush is not None:
                self.flush.zero_()
            times.append(self._once(fn))
        return statistics.median(times)

    def _once(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def copy_bandwidth(device: str, timer: Timer) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (64 MiB on CPU)."""
    n = (1 << 30) if device == "cuda" else (64 << 20)
    src, dst = torch.empty(n, dtype=torch.int8, device=device), torch.empty(n, dtype=torch.int8, device=device)
    return 2 * n / (timer(lambda: dst.copy_(src), flush=False) * 1e-6)


def model_time(layers: list[list[dict]], meta, kind: str, device: str, timer: Timer) -> float:
    """Per-layer microseconds of the Triton path over all layers: graph replay on CUDA, eager on CPU."""
    fns = [layer_fn(calls, meta, "triton", kind) for calls in layers]

    def run_all() -> None:
        for f in fns:
            f()

    run_all()  # compile
    if device != "cuda":
        return timer(run_all) / len(layers)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    return timer(graph.replay, flush=False) / len(layers)


def bench_config(model: str, layers: list[list[dict]], adapters: int, prefill: bool,
                 bandwidth: float, device: str, timer: Timer) -> Row:
    from loraplex.kernels.lora import LoRABatchMeta, use_bgmv

    tokens = layers[0][0]["x"].shape[0]
    meta = LoRABatchMeta.build(batch_slots(tokens, adapters, prefill), device)
    path = "bgmv" if use_bgmv(meta) else "sgmv"
    per_path = {k: model_time(layers, meta, k, device, timer) for k in ("sgmv", "bgmv")}
    eager = timer(layer_fn(layers[0], meta, "triton", "auto"))
    ref = timer(layer_fn(layers[0], meta, "torch", "auto"))
    floor = floor_bytes(layers[0], adapters) / bandwidth * 1e6
    graph = per_path[path]
    return Row(model, tokens, adapters, path, graph, per_path["sgmv"], per_path["bgmv"], eager, ref, floor,
               100 * floor / graph, ref / graph)


def run(shapes: dict, token_counts: tuple[int, ...], adapter_counts: tuple[int, ...], device: str,
        reps: int) -> tuple[list[Row], float]:
    timer = Timer(device, reps)
    bandwidth = copy_bandwidth(device, timer)
    rows = []
    for model, (hidden, inter, q, kv, num_layers) in shapes.items():
        dims = layer_dims(hidden, inter, q, kv)
        for tokens in token_counts:
            layers = [make_layer(dims, tokens, device) for _ in range(num_layers)]
            for adapters in adapter_counts:
                rows.append(bench_config(model, layers, adapters, tokens > 64, bandwidth, device, timer))
                print(_fmt(rows[-1]), flush=True)
            del layers
    return rows, bandwidth


HEADER = ("| model | tokens | adapters | path | graph µs/layer | sgmv µs | bgmv µs | eager µs | torch ref µs "
          "| byte floor µs | % of floor | × torch |\n|" + " --- |" * 12)


def _fmt(r: Row) -> str:
    return (f"| {r.model} | {r.tokens} | {r.adapters} | {r.path} | {r.graph_us:.1f} | {r.sgmv_us:.1f} | "
            f"{r.bgmv_us:.1f} | {r.eager_us:.1f} | {r.torch_us:.1f} | {r.floor_us:.1f} | {r.pct_of_floor:.0f}% | "
            f"{r.speedup_vs_torch:.1f} |")


VARIANTS = {  # name: (split-K target programs, partials)
    "atomic-1024": (1024, 0), "part-4": (1024, 4), "part-8": (1024, 8), "part-16": (1024, 16),
}
SWEEP = [(64, 1, False), (64, 8, False), (64, 64, False), (128, 64, True), (256, 1, True), (256, 8, True),
         (256, 64, True)]  # tokens, adapters, prefill


def sweep(timer: Timer) -> list[dict]:
    """Graph time per layer of every split-K variant on both paths, then an eager kernel profile."""
    from loraplex.kernels import lora_triton
    from loraplex.kernels.lora import LoRABatchMeta

    results = []
    for model, (hidden, inter, q, kv, num_layers) in SHAPES.items():
        dims = layer_dims(hidden, inter, q, kv)
        for tokens in sorted({t for t, _, _ in SWEEP}):
            layers = [make_layer(dims, tokens, "cuda") for _ in range(num_layers)]
            for _, adapters, prefill in [c for c in SWEEP if c[0] == tokens]:
                meta = LoRABatchMeta.build(batch_slots(tokens, adapters, prefill), "cuda")
                row: dict = dict(model=model, tokens=tokens, adapters=adapters, max_seg_len=meta.max_seg_len)
                for name, (target, partials) in VARIANTS.items():
                    lora_triton._TARGET_PROGRAMS = target
                    for calls in layers:
                        set_bufs(calls, partials)
                    for kind in ("sgmv", "bgmv"):
                        row[f"{kind}/{name}"] = round(model_time(layers, meta, kind, "cuda", timer), 1)
                lora_triton._TARGET_PROGRAMS = VARIANTS["atomic-1024"][0]
                for calls in layers:
                    set_bufs(calls, None)
                print(json.dumps(row), flush=True)
                print(kernel_profile(layers[0], meta), flush=True)
                results.append(row)
            del layers
    return results


def kernel_profile(calls: list[dict], meta) -> str:
    """GPU time per kernel of one eager layer on each path (default settings)."""
    from torch.profiler import ProfilerActivity, profile

    lines = []
    for kind in ("sgmv", "bgmv"):
        fn = layer_fn(calls, meta, "triton", kind)
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        for e in prof.key_averages():
            if e.device_time_total > 0:
                lines.append(f"  {kind} {e.key[:40]:40s} n={e.count // 5:2d} {e.device_time_total / 5:8.1f} us/layer")
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        host_us = (time.perf_counter() - t0) * 1e6 / (20 * len(calls))
        torch.cuda.synchronize()
        lines.append(f"  {kind} host time per add_lora call (eager, no sync): {host_us:.1f} us")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    parser.add_argument("--sweep", action="store_true", help="tuning sweep of split-K variants (GPU)")
    args = parser.parse_args()
    if args.sweep:
        results = sweep(Timer("cuda", reps=10))
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "lora_kernels_sweep.json"), "w") as f:
                json.dump(results, f, indent=1)
        return
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before loraplex.kernels.lora_triton imports triton
        rows, bw = run(SMOKE_SHAPES, (8, 72), (1, 4), "cpu", reps=1)
        device_name = "CPU (smoke run, Triton interpreter: timings meaningless)"
    else:
        print("| model | tokens | adapters | ... (rows as they finish)", flush=True)
        rows, bw = run(SHAPES, (64, 256), (1, 8, 32, 64), "cuda", reps=20)
        device_name = torch.cuda.get_device_name()
    print(f"\n{device_name}, {datetime.date.today()}, torch {torch.__version__}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)\n\n{HEADER}")
    print("\n".join(_fmt(r) for r in rows))
    if os.environ.get("OUT"):
        report = dict(device=device_name, date=str(datetime.date.today()), torch=torch.__version__,
                      copy_bandwidth_bytes_per_s=bw, rank=RANK, slots=SLOTS, rows=[asdict(r) for r in rows])
        with open(os.path.join(os.environ["OUT"], "lora_kernels.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
