"""Per-decoder-layer LoRA cost of the Triton SGMV/BGMV kernels (bf16, rank 16, 64 slots).

One layer = 4 add_lora calls (fused qkv, o, fused gate_up, down) = all 7 projections.
Kernel time is one CUDA-graph replay across enough layers (distinct weights and activations, so
little stays in L2), divided by the layer count; eager time is the same layers run eagerly (host
launch overhead included, as the engine's eager prefill steps see it). Byte floor: x read + y read
and written + each distinct adapter's A/B read once, over the copy bandwidth measured in the run.

    python bench/lora_kernels.py              # decode 64 / prefill 256 tokens x 1..64 adapters (BENCHMARKS.md)
    python bench/lora_kernels.py --sweep      # old (bench/lora_kernels_v1.py) vs new vs torch reference over
                                              # tokens {1..16384} x distinct adapters {1,4,32} x 2 models
    python bench/lora_kernels.py --tune       # new kernels: every plan (BGMV, SGMV tile rows) per shape
    python bench/lora_kernels.py --sweep --cpu-smoke   # tiny shapes on CPU, Triton in its interpreter

JSON goes to --out (default bench/results/) and to $OUT when set, named after --models when a
subset runs (lora_kernels_sweep_llama3-8b.json); a table is printed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHAPES = {  # hidden, intermediate, q, kv, layers
    "qwen3-0.6b": (1024, 3072, 2048, 1024, 28),
    "llama3-8b": (4096, 14336, 4096, 1024, 32),
}
SMOKE_SHAPES = {"tiny": (64, 96, 64, 32, 1)}
RANK, SLOTS = 16, 64
SWEEP_TOKENS, SWEEP_DISTINCT = (1, 8, 32, 128, 512, 4096, 16384), (1, 4, 32)
SMOKE_TOKENS, SMOKE_DISTINCT = (1, 40), (1, 2)
MAX_REQUESTS = 32  # sweep batches: min(T, 32) requests of T / requests contiguous tokens each
SMOKE_REQUESTS = 2  # the interpreter runs each program in Python: few segments, few programs
LAYER_BYTES = 512 << 20  # graph timings run over about this much per-layer data (>> L2), up to the model's layers


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
    return calls


def layer_bytes(calls: list[dict]) -> int:
    return sum(c[k].numel() * c[k].element_size() for c in calls for k in ("x", "y", "lora_a", "lora_b"))


def make_layers(dims: list[tuple[int, list[int]]], tokens: int, device: str, max_layers: int) -> list[list[dict]]:
    first = make_layer(dims, tokens, device)
    count = max(1, min(max_layers, -(-LAYER_BYTES // layer_bytes(first))))
    return [first] + [make_layer(dims, tokens, device) for _ in range(count - 1)]


def batch_slots(tokens: int, adapters: int, prefill: bool) -> list[int]:
    """The default table's batches: prefill = one segment per adapter; decode = round-robin."""
    if prefill:
        return [t * adapters // tokens for t in range(tokens)]
    return [t % adapters for t in range(tokens)]


def sweep_slots(tokens: int, distinct: int, max_requests: int = MAX_REQUESTS) -> list[int]:
    """min(T, 32) requests of contiguous tokens (decode when T <= 32), request r on adapter r % distinct
    (a scattered pick of slots, not 0..d-1)."""
    requests = min(tokens, max_requests)
    lengths = [tokens // requests + (r < tokens % requests) for r in range(requests)]
    return [(r % distinct) * 7 % SLOTS for r, n in enumerate(lengths) for _ in range(n)]


class Impl:
    """One implementation of add_lora: the package's (new), the frozen v1 (old) or the torch reference.
    partials: the shrink buffers' P (None: each implementation's default)."""

    def __init__(self, name: str, partials: int | None = None):
        self.name, self.partials = name, partials
        if name == "old":
            self.mod: Any = _v1()
        else:
            from loraplex.kernels import lora

            self.mod = lora

    def meta(self, slots: list[int], device: str) -> Any:
        return self.mod.LoRABatchMeta.build(slots, device)

    def layer_fn(self, calls: list[dict], meta: Any, kind: str = "auto", plan: Any = None) -> Callable[[], None]:
        if plan is not None:  # a shallow copy keeps the host rows and shares the tile tables
            meta = copy.copy(meta)
            meta.plan = plan
        bufs = [self._buf(c) for c in calls]
        extra = {} if self.name == "old" else {"backend": "torch" if self.name == "torch" else "triton"}

        def run() -> None:
            for c, buf in zip(calls, bufs, strict=True):
                self.mod.add_lora(c["y"], c["x"], c["lora_a"], c["lora_b"], c["scales"], c["out_slices"], meta,
                                  buf=buf, kind=kind, **extra)
        return run

    def _buf(self, c: dict) -> torch.Tensor:
        return self.mod.lora_buffer(c["x"].shape[0], c["lora_a"], self.partials)


def _v1() -> Any:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("lora_kernels_v1")


def floor_bytes(calls: list[dict], adapters: int) -> int:
    total = 0
    for c in calls:
        total += c["x"].numel() * 2 + 2 * c["y"].numel() * 2
        total += adapters * (c["lora_a"][0].numel() + c["lora_b"][0].numel()) * 2
    return total


class Timer:
    """Median microseconds of fn; on CUDA with events (and an L2 flush before each rep when asked)."""

    def __init__(self, device: str, reps: int):
        self.cuda, self.reps = device == "cuda", reps
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if self.cuda else None

    def __call__(self, fn: Callable[[], object], flush: bool = True) -> float:
        if self.cuda:  # warm-up (the interpreter of a CPU smoke run has nothing to warm)
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


def model_time(fns: list[Callable[[], None]], device: str, timer: Timer, graph: bool) -> float:
    """Per-layer microseconds over all layers: one graph replay on CUDA when ``graph``, else eager."""
    def run_all() -> None:
        for f in fns:
            f()

    if device != "cuda" or not graph:
        return timer(run_all, flush=False) / len(fns)
    run_all()  # compile
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run_all()
    return timer(g.replay, flush=False) / len(fns)


def max_error(layer: list[dict], paths: dict[str, Impl], metas: dict[str, Any]) -> dict[str, float]:
    """Largest |y - y_torch| of one layer's four calls, for old and new, relative to max |delta_torch|."""
    ys = {}
    for name in ("torch", "old", "new"):
        for c in layer:
            c["y"].zero_()
        paths[name].layer_fn(layer, metas[name])()
        ys[name] = [c["y"].float() for c in layer]
    scale = max(float(d.abs().max()) for d in ys["torch"]) or 1.0
    return {f"{n}_rel_err": round(max(float((a - b).abs().max()) for a, b in zip(ys[n], ys["torch"], strict=True))
                                  / scale, 5) for n in ("old", "new")}


def compiled(impl: Impl) -> int:
    """Kernel binaries compiled so far by an implementation's Triton kernels (0 in the interpreter)."""
    if impl.name == "new":
        from loraplex.kernels import lora_triton

        return lora_triton.compiled_variants()
    kernels = [getattr(impl.mod, k) for k in dir(impl.mod) if k.endswith("_kernel")]
    return sum(len(c[0]) for k in kernels for c in getattr(k, "device_caches", {}).values())


def sweep_config(model: str, layers: list[list[dict]], distinct: int, device: str, timer: Timer,
                 paths: dict[str, Impl], bandwidth: float) -> dict:
    tokens = layers[0][0]["x"].shape[0]
    slots = sweep_slots(tokens, distinct, MAX_REQUESTS if device == "cuda" else SMOKE_REQUESTS)
    metas = {name: p.meta(slots, device) for name, p in paths.items()}
    plan = metas["new"].plan_for(RANK)
    row: dict = dict(model=model, tokens=tokens, distinct=distinct, plan=f"{plan.kind}/{plan.block_m}",
                     old_path="bgmv" if paths["old"].mod.use_bgmv(metas["old"]) else "sgmv", layers=len(layers))
    for name in ("old", "new"):
        before = compiled(paths[name])
        fns = [paths[name].layer_fn(calls, metas[name]) for calls in layers]
        row[f"{name}_graph_us"] = round(model_time(fns, device, timer, graph=True), 2)
        row[f"{name}_eager_us"] = round(model_time(fns, device, timer, graph=False), 2) if device == "cuda" \
            else row[f"{name}_graph_us"]
        row[f"{name}_compiles"] = compiled(paths[name]) - before
    row["torch_us"] = round(timer(paths["torch"].layer_fn(layers[0], metas["torch"])), 2)
    row["floor_us"] = round(floor_bytes(layers[0], distinct) / bandwidth * 1e6, 2)
    row["graph_speedup"] = round(row["old_graph_us"] / row["new_graph_us"], 2)
    row["eager_speedup"] = round(row["old_eager_us"] / row["new_eager_us"], 2)
    row["new_pct_of_floor"] = round(100 * row["floor_us"] / row["new_graph_us"], 1)
    row.update(max_error(layers[0], paths, metas))
    return row


SWEEP_HEADER = ("| model | tokens | adapters | plan (old) | old graph µs | new graph µs | × | old eager µs | "
                "new eager µs | × | torch µs | floor µs | new % floor | compiles old/new | rel err old/new |\n|"
                + " --- |" * 15)


def _sweep_line(r: dict) -> str:
    return (f"| {r['model']} | {r['tokens']} | {r['distinct']} | {r['plan']} ({r['old_path']}) | "
            f"{r['old_graph_us']:.1f} | {r['new_graph_us']:.1f} | {r['graph_speedup']:.2f} | {r['old_eager_us']:.1f} | "
            f"{r['new_eager_us']:.1f} | {r['eager_speedup']:.2f} | {r['torch_us']:.1f} | {r['floor_us']:.1f} | "
            f"{r['new_pct_of_floor']:.0f}% | {r['old_compiles']}/{r['new_compiles']} | {r['old_rel_err']:.0e}/{r['new_rel_err']:.0e} |")


def warm_new(shapes: dict, device: str) -> None:
    """lora.warmup for every layer shape, so the sweep counts the compiles a served batch would cause."""
    from loraplex.kernels import lora

    for hidden, inter, q, kv, _ in shapes.values():
        for call in make_layer(layer_dims(hidden, inter, q, kv), 1, device):
            lora.warmup(call["lora_a"], call["lora_b"], call["scales"], call["out_slices"], backend="triton")


def sweep(shapes: dict, tokens_list: tuple[int, ...], distinct_list: tuple[int, ...], device: str,
          timer: Timer, bandwidth: float) -> list[dict]:
    paths = {name: Impl(name) for name in ("old", "new", "torch")}
    if device == "cuda":
        warm_new(shapes, device)
    rows = []
    for model, (hidden, inter, q, kv, num_layers) in shapes.items():
        dims = layer_dims(hidden, inter, q, kv)
        for tokens in tokens_list:
            layers = make_layers(dims, tokens, device, num_layers)
            for distinct in sorted({min(d, tokens, MAX_REQUESTS if device == "cuda" else SMOKE_REQUESTS)
                                    for d in distinct_list}):
                rows.append(sweep_config(model, layers, distinct, device, timer, paths, bandwidth))
                print(_sweep_line(rows[-1]), flush=True)
            del layers
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


TUNE_TOKENS, TUNE_DISTINCT = (8, 32, 128, 512, 4096, 16384), (1, 4, 32)


def tune(shapes: dict, tokens_list: tuple[int, ...], device: str, timer: Timer) -> list[dict]:
    """Graph µs/layer of the new kernels under every plan, per batch shape; marks the plan's choice."""
    from loraplex.kernels.lora import LoRAPlan

    new = Impl("new")
    plans = [LoRAPlan("bgmv", 16)] + [LoRAPlan("sgmv", b) for b in (16, 32, 64, 128)]
    requests = MAX_REQUESTS if device == "cuda" else SMOKE_REQUESTS
    rows = []
    for model, (hidden, inter, q, kv, num_layers) in shapes.items():
        dims = layer_dims(hidden, inter, q, kv)
        for tokens in tokens_list:
            layers = make_layers(dims, tokens, device, num_layers)
            for distinct in sorted({min(d, tokens, requests) for d in TUNE_DISTINCT}):
                meta = new.meta(sweep_slots(tokens, distinct, requests), device)
                row: dict = dict(model=model, tokens=tokens, distinct=distinct, chosen=str(meta.plan_for(RANK)))
                for p in plans:
                    fns = [new.layer_fn(calls, meta, plan=p) for calls in layers]
                    row[f"{p.kind}/{p.block_m}"] = round(model_time(fns, device, timer, graph=True), 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
            del layers
    return rows


def default_table(shapes: dict, token_counts: tuple[int, ...], adapter_counts: tuple[int, ...], device: str,
                  timer: Timer, bandwidth: float) -> list[dict]:
    """Decode (round-robin) and prefill (one segment per adapter) batches: auto path vs both forced."""
    new, ref = Impl("new"), Impl("torch")
    rows = []
    for model, (hidden, inter, q, kv, num_layers) in shapes.items():
        dims = layer_dims(hidden, inter, q, kv)
        for tokens in token_counts:
            layers = make_layers(dims, tokens, device, num_layers)
            for adapters in adapter_counts:
                meta = new.meta(batch_slots(tokens, adapters, tokens > 64), device)
                t = {k: model_time([new.layer_fn(c, meta, k) for c in layers], device, timer, graph=True)
                     for k in ("auto", "sgmv", "bgmv")}
                floor = floor_bytes(layers[0], adapters) / bandwidth * 1e6
                p = meta.plan_for(RANK)
                rows.append(dict(model=model, tokens=tokens, adapters=adapters, plan=f"{p.kind}/{p.block_m}",
                                 graph_us=t["auto"], sgmv_us=t["sgmv"], bgmv_us=t["bgmv"],
                                 eager_us=timer(new.layer_fn(layers[0], meta)),
                                 torch_us=timer(ref.layer_fn(layers[0], ref.meta(meta.token_slots.tolist(), device))),
                                 floor_us=floor, pct_of_floor=100 * floor / t["auto"]))
                print(json.dumps(rows[-1]), flush=True)
            del layers
    return rows


TABLE_HEADER = ("| model | tokens | adapters | plan | graph µs/layer | sgmv µs | bgmv µs | eager µs | torch ref µs "
                "| byte floor µs | % of floor |\n|" + " --- |" * 11)


def _table_line(r: dict) -> str:
    return (f"| {r['model']} | {r['tokens']} | {r['adapters']} | {r['plan']} | {r['graph_us']:.1f} | "
            f"{r['sgmv_us']:.1f} | {r['bgmv_us']:.1f} | {r['eager_us']:.1f} | {r['torch_us']:.1f} | "
            f"{r['floor_us']:.1f} | {r['pct_of_floor']:.0f}% |")


def write_json(name: str, report: dict, out_dir: str) -> None:
    dirs = {out_dir, os.environ.get("OUT") or out_dir}
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {os.path.join(d, name)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="old vs new vs torch over tokens x adapters x models")
    mode.add_argument("--tune", action="store_true", help="new kernels under every plan, per batch shape (GPU)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated subset of: " + ", ".join(SHAPES))
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (sweep, tune; default the full list)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="JSON folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before loraplex.kernels.lora_triton imports triton
    device = "cpu" if args.cpu_smoke else "cuda"
    shapes = SMOKE_SHAPES if args.cpu_smoke else {m: SHAPES[m] for m in args.models.split(",")}
    timer = Timer(device, 1 if args.cpu_smoke else args.reps)
    bandwidth = copy_bandwidth(device, timer)
    device_name = "CPU (smoke run, Triton interpreter: timings meaningless)" if args.cpu_smoke \
        else torch.cuda.get_device_name()
    report: dict = dict(device=device_name, date=str(datetime.date.today()), torch=torch.__version__,
                        copy_bandwidth_bytes_per_s=bandwidth, rank=RANK, slots=SLOTS)
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else None
    suffix = "" if args.cpu_smoke or set(shapes) == set(SHAPES) else "_" + "+".join(shapes)
    if args.tune:
        report["rows"] = tune(shapes, tokens or (SMOKE_TOKENS if args.cpu_smoke else TUNE_TOKENS), device, timer)
        write_json(f"lora_kernels_tune{suffix}.json", report, args.out)
        return
    if args.sweep:
        distinct = SMOKE_DISTINCT if args.cpu_smoke else SWEEP_DISTINCT
        report["rows"] = sweep(shapes, tokens or (SMOKE_TOKENS if args.cpu_smoke else SWEEP_TOKENS), distinct,
                               device, timer, bandwidth)
        print(f"\n{device_name}, {report['date']}, torch {torch.__version__}, copy bandwidth "
              f"{bandwidth / 1e12:.2f} TB/s (read + write); µs per decoder layer\n\n{SWEEP_HEADER}")
        print("\n".join(_sweep_line(r) for r in report["rows"]))
        write_json(f"lora_kernels_sweep{suffix}.json", report, args.out)
        return
    counts = ((8, 72), (1, 4)) if args.cpu_smoke else ((64, 256), (1, 8, 32, 64))
    report["rows"] = default_table(shapes, counts[0], counts[1], device, timer, bandwidth)
    print(f"\n{device_name}, {report['date']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s\n\n{TABLE_HEADER}")
    print("\n".join(_table_line(r) for r in report["rows"]))
    write_json("lora_kernels.json", report, args.out)


if __name__ == "__main__":
    main()
