"""Skinny GEMM: cuBLAS (F.linear) against the Triton kernel (kernels/gemv_triton) over a grid of
configs, for every linear shape of Qwen3-0.6B and Llama-3-8B and M in {1, 2, 4, 8, 16, 32} rows, bf16.

Timed as a decode step sees it: one CUDA graph of back-to-back launches, each on its own copy of
the weight (enough copies to exceed the 50 MB L2 four times over), so no launch finds its weight in
L2 and launch overhead is not in the figure; median of several replays, divided by the launch
count. Every config's output is checked against cuBLAS before it is timed. Two passes per shape:
the grid (CUDA-core GEMV with BLOCK_M = M for M <= 8, tensor-core tiles for M >= 2, split-K values
around one wave of programs), then the best three again with other pipeline depths and, where
split, the atomic reduction instead of the partials one. The byte floor is W, x and y moved once
over the copy bandwidth measured in this run (bytes read + written per second).

    python bench/gemv_sweep.py                  # GPU: table + bench/results/gemv_sweep.json (and $OUT)
    python bench/gemv_sweep.py --write-table    # ... and kernels/gemv_configs.json for this GPU model
    python bench/gemv_sweep.py --models qwen3-0.6b --m 1 --budget-s 60
    python bench/gemv_sweep.py --cpu-smoke --out /tmp/s.json   # tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SHAPES: dict[str, dict[str, tuple[int, int]]] = {  # model: projection: (N, K)
    "qwen3-0.6b": {"qkv": (4096, 1024), "o_proj": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
                   "lm_head": (151936, 1024)},
    "llama3-8b": {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                  "lm_head": (128256, 4096)},
}
LAYERS = {"qwen3-0.6b": 28, "llama3-8b": 32}
SMOKE_SHAPES = {"tiny": {"up": (40, 64), "down": (24, 96)}}
M_VALUES = (1, 2, 4, 8, 16, 32)
L2_BYTES = 50 << 20
MARGIN = 0.03  # the table takes the kernel only where it beats cuBLAS by more than this


@dataclass(frozen=True)
class Grid:
    """Tuning grid: CUDA-core (fma) tiles per BLOCK_M, tensor-core tiles, split-K values."""

    fma: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]  # block_m: (block_n values, block_k values)
    dot: tuple[tuple[int, int], ...]  # (block_n, block_k)
    dot_swap: tuple[tuple[int, int], ...]
    warps: tuple[int, ...] = (4, 8)
    splits: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
    min_elems: int = 16  # fma accumulator elements per thread: at least this (enough loads in flight) ...
    max_elems: int = 128  # ... and at most this (registers)


GPU_GRID = Grid(
    fma={1: ((4, 8, 16, 32), (256, 512, 1024)), 2: ((4, 8, 16), (256, 512, 1024)),
         4: ((2, 4, 8), (128, 256, 512)), 8: ((1, 2, 4), (128, 256, 512))},
    dot=((16, 128), (16, 256), (32, 128), (32, 256), (64, 128), (64, 256)),
    dot_swap=((64, 64), (64, 128), (128, 64), (128, 128)),
)
SMOKE_GRID = Grid(fma={1: ((4, 8), (16, 32)), 4: ((4,), (32,))}, dot=((16, 32),), dot_swap=(), warps=(4,),
                  min_elems=0)


def gemv():  # type: ignore[no-untyped-def]  # imported late: --cpu-smoke sets TRITON_INTERPRET first
    from loraplex.kernels import gemv as module

    return module


def split_choices(n: int, k: int, bn: int, bk: int, splits: Sequence[int], sms: int) -> list[int]:
    """1, the smallest split giving at least one program per SM, and the next two; only splits whose
    K ranges are whole tiles (or all of them on shapes where none is)."""
    even = [s for s in splits if k % (s * bk) == 0]
    allowed = even or [s for s in splits if math.ceil(k / s) >= bk] or [1]
    tiles = math.ceil(n / bn)
    first = next((i for i, s in enumerate(allowed) if tiles * s >= sms), len(allowed) - 1)
    return sorted({allowed[0], *allowed[first:first + 3]})


def candidates(m: int, n: int, k: int, grid: Grid, sms: int) -> list:
    """Pass-1 configs for M rows: the default config first, then the grid."""
    g = gemv()
    bm = g.m_bucket(m)
    out = [g.default_config(m, n, k, sms)]
    if bm in grid.fma:
        bns, bks = grid.fma[bm]
        for bn, bk, warps in product(bns, bks, grid.warps):
            if not grid.min_elems <= bm * bn * bk / (32 * warps) <= grid.max_elems:
                continue
            out += [g.GemvConfig(bm, bn, bk, split_k=s, num_warps=warps)
                    for s in split_choices(n, k, bn, bk, grid.splits, sms)]
    if bm >= 2:
        for mode, tiles in (("dot", grid.dot), ("dot_swap", grid.dot_swap)):
            for bn, bk in tiles:
                out += [g.GemvConfig(max(16, bm), bn, bk, split_k=s, mode=mode, num_warps=4, num_stages=3)
                        for s in split_choices(n, k, bn, bk, grid.splits, sms)]
    return list(dict.fromkeys(out))


def refinements(cfg) -> list:
    """Pass 2 around a good config: other pipeline depths; the atomic reduction where split."""
    stages = (2, 3) if cfg.mode == "fma" else (2, 4)
    out = [replace(cfg, num_stages=s) for s in stages if s != cfg.num_stages]
    if cfg.split_k > 1:
        out.append(replace(cfg, reduce="atomic" if cfg.reduce == "partials" else "partials"))
    return out


class Bench:
    """Copies of one weight shape and their inputs; times a launch function over all copies."""

    def __init__(self, n: int, k: int, max_m: int, device: str, reps: int):
        self.n, self.k, self.device, self.reps = n, k, device, reps
        copies = 1 if device != "cuda" else min(32, max(2, math.ceil(4 * L2_BYTES / (2 * n * k))))
        self.launches = copies * math.ceil(8 / copies) if device == "cuda" else 1
        gen = torch.Generator(device=device).manual_seed(n * 31 + k)
        self.w = [torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) * k ** -0.5
                  for _ in range(copies)]
        self.x = [torch.randn(max_m, k, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(copies)]

    def calls(self, fn: Callable[[torch.Tensor, torch.Tensor], object], m: int) -> list[Callable[[], object]]:
        c = len(self.w)
        return [lambda i=i: fn(self.x[i % c][:m], self.w[i % c]) for i in range(self.launches)]

    def time(self, fn: Callable[[torch.Tensor, torch.Tensor], object], m: int) -> float:
        """Microseconds per launch: graph replays on CUDA, eager wall time elsewhere."""
        calls = self.calls(fn, m)
        for c in calls:
            c()
        if self.device != "cuda":
            t = time.perf_counter()
            for _ in range(self.reps):
                for c in calls:
                    c()
            return (time.perf_counter() - t) * 1e6 / (self.reps * len(calls))
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        graph.replay()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(self.reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / len(calls))
        del graph
        return statistics.median(times)

    def eager_wall(self, fn: Callable[[torch.Tensor, torch.Tensor], object], m: int, rounds: int = 20) -> float:
        """Microseconds per call of back-to-back eager calls (host launch overhead included)."""
        calls = self.calls(fn, m)
        for c in calls:
            c()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(rounds):
            for c in calls:
                c()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e6 / (rounds * len(calls))

    def check(self, cfg, m: int) -> str | None:
        """None when the config's output matches cuBLAS (bf16 tolerance), else what went wrong."""
        x, w = self.x[0][:m], self.w[0]
        try:
            got = gemv().skinny_linear(x, w, backend="triton", config=cfg).float()
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects is skipped, not fatal
            return f"{type(e).__name__}: {str(e)[:200]}"
        want = F.linear(x, w).float() if self.device == "cuda" else gemv().skinny_linear_torch(x, w).float()
        err = (got - want).abs().max().item()
        return None if err <= 0.05 + 0.02 * want.abs().max().item() else f"max abs error {err:.3g}"


@dataclass
class Case:
    model: str
    proj: str
    m: int
    n: int
    k: int
    cublas_us: float
    triton_us: float
    config: dict[str, Any]
    speedup: float  # cuBLAS time / Triton time
    floor_us: float
    pct_of_floor: float  # of the faster of the two
    use: bool  # the table takes the kernel for this shape inside CUDA graphs
    eager_cublas_us: float  # back-to-back eager calls, wall time per call (host launch cost included)
    eager_triton_us: float
    use_eager: bool  # ... and for eager launches
    best_by_reduce: dict[str, float] = field(default_factory=dict)  # direct / partials / atomic: best µs
    tried: int = 0
    failed: list[str] = field(default_factory=list)
    top: list[tuple[dict[str, Any], float]] = field(default_factory=list)


def run_case(model: str, proj: str, m: int, bench: Bench, grid: Grid, sms: int, bandwidth: float,
             deadline: float, seeds: Sequence[Any] = ()) -> Case:
    """Pass 1 (the default config, configs that won elsewhere for this M, the grid), then pass 2 around
    the best three. Past ``deadline`` a case stops once three configs have been timed."""
    n, k = bench.n, bench.k
    cublas = bench.time(F.linear, m)
    results: dict[Any, float] = {}
    failed: list[str] = []

    def trial(cfg: Any) -> None:
        if cfg in results or (len(results) >= 3 and time.perf_counter() > deadline):
            return
        problem = bench.check(cfg, m)
        if problem:
            failed.append(f"{cfg}: {problem}")
            return
        results[cfg] = bench.time(lambda x, w: gemv().skinny_linear(x, w, backend="triton", config=cfg), m)

    first = candidates(m, n, k, grid, sms)
    for cfg in [first[0], *seeds, *first[1:]]:
        trial(cfg)
    if not results:
        raise RuntimeError(f"no config ran for {model} {proj} M={m}: {failed}")
    for cfg in sorted(results, key=results.__getitem__)[:3]:
        for r in refinements(cfg):
            trial(r)
    best = min(results, key=results.__getitem__)
    by_reduce: dict[str, float] = {}
    for cfg, us in results.items():
        kind = "direct" if cfg.split_k == 1 else cfg.reduce
        by_reduce[kind] = min(us, by_reduce.get(kind, math.inf))
    floor = 2 * (n * k + m * k + m * n) / bandwidth * 1e6
    top = [(c.to_json(), round(us, 2)) for c, us in sorted(results.items(), key=lambda kv: kv[1])[:5]]
    use = results[best] < cublas * (1 - MARGIN)
    eager_cublas, eager_triton = cublas, results[best]  # on CPU every timing is eager already
    if bench.device == "cuda":
        eager_cublas = bench.eager_wall(F.linear, m)
        eager_triton = bench.eager_wall(lambda x, w: gemv().skinny_linear(x, w, backend="triton", config=best), m)
    return Case(model, proj, m, n, k, cublas, results[best], best.to_json(), cublas / results[best], floor,
                100 * floor / min(cublas, results[best]), use, eager_cublas, eager_triton,
                use and eager_triton < eager_cublas * (1 - MARGIN),
                {k_: round(v, 2) for k_, v in by_reduce.items()}, len(results), failed[:5], top)


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a device-to-device copy (1 GiB; 16 MiB on CPU)."""
    n = (1 << 30) if device == "cuda" else (16 << 20)
    src, dst = torch.empty(n, dtype=torch.int8, device=device), torch.empty(n, dtype=torch.int8, device=device)
    dst.copy_(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync()
    return 2 * n * 10 / (time.perf_counter() - t)


def sweep(shapes: dict[str, dict[str, tuple[int, int]]], ms: Sequence[int], grid: Grid, device: str, reps: int,
          budget_s: float) -> tuple[list[Case], float]:
    """Every (model, projection, M) in order; past the budget the remaining cases try only the
    default config and the winners of earlier cases with the same M."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    bandwidth = copy_bandwidth(device)
    deadline = time.perf_counter() + budget_s
    cases: list[Case] = []
    for model, projs in shapes.items():
        for proj, (n, k) in projs.items():
            bench = Bench(n, k, max(ms), device, reps)
            for m in ms:
                seeds = [gemv().GemvConfig(**c.config) for c in cases if c.m == m]
                cases.append(run_case(model, proj, m, bench, grid, sms, bandwidth, deadline, seeds))
                print(fmt(cases[-1]), flush=True)
            del bench
            if device == "cuda":
                torch.cuda.empty_cache()
    return cases, bandwidth


HEADER = ("| model | proj | M | N | K | cuBLAS µs | Triton µs | × | floor µs | % floor | use | eager cuBLAS / "
          "Triton µs | use eager | config |\n|" + " --- |" * 14)


def fmt(c: Case) -> str:
    cfg = c.config
    desc = (f"{cfg['mode']} m{cfg['block_m']} n{cfg['block_n']} k{cfg['block_k']} s{cfg['split_k']}"
            f"{'/' + cfg['reduce'] if cfg['split_k'] > 1 else ''} w{cfg['num_warps']} st{cfg['num_stages']}")
    return (f"| {c.model} | {c.proj} | {c.m} | {c.n} | {c.k} | {c.cublas_us:.1f} | {c.triton_us:.1f} | "
            f"{c.speedup:.2f} | {c.floor_us:.1f} | {c.pct_of_floor:.0f}% | {'yes' if c.use else 'no'} | "
            f"{c.eager_cublas_us:.1f} / {c.eager_triton_us:.1f} | {'yes' if c.use_eager else 'no'} | {desc} |")


def step_totals(cases: list[Case]) -> list[dict[str, Any]]:
    """Per model and M: the linear layers of one decode step (every layer + LM head), cuBLAS vs the table's pick."""
    out = []
    for model in dict.fromkeys(c.model for c in cases):
        for m in dict.fromkeys(c.m for c in cases if c.model == model):
            rows = {c.proj: c for c in cases if c.model == model and c.m == m}
            layers = LAYERS.get(model, 1)
            mult = {p: (1 if p == "lm_head" else layers) for p in rows}
            cublas = sum(mult[p] * c.cublas_us for p, c in rows.items())
            picked = sum(mult[p] * (c.triton_us if c.use else c.cublas_us) for p, c in rows.items())
            out.append(dict(model=model, m=m, cublas_us=round(cublas, 1), picked_us=round(picked, 1),
                            saved_us=round(cublas - picked, 1)))
    return out


def write_table(cases: list[Case], device_name: str, path: Path) -> None:
    """Merges this run's entries into the table that kernels/gemv.py reads (this GPU model's entries
    for shapes not measured in this run stay)."""
    import triton

    table = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    old = table.setdefault("devices", {}).get(device_name, {}).get("entries", [])
    entries = {(e["m"], e["n"], e["k"], e["dtype_bytes"]): e for e in old}
    for c in cases:
        entries[(c.m, c.n, c.k, 2)] = dict(
            m=c.m, n=c.n, k=c.k, dtype_bytes=2, use=c.use, use_eager=c.use_eager, config=c.config,
            triton_us=round(c.triton_us, 2), cublas_us=round(c.cublas_us, 2),
            eager_triton_us=round(c.eager_triton_us, 2), eager_cublas_us=round(c.eager_cublas_us, 2))
    table["devices"][device_name] = dict(date=str(datetime.date.today()), torch=torch.__version__,
                                         triton=triton.__version__, entries=[entries[k] for k in sorted(entries)])
    path.write_text(dump_table(table))
    print(f"wrote {path} ({device_name}: of {len(cases)} shapes, {sum(c.use for c in cases)} take the kernel "
          f"in CUDA graphs, {sum(c.use_eager for c in cases)} eagerly)")


def dump_table(table: dict[str, Any]) -> str:
    """The table as JSON with one line per entry (readable diffs)."""
    devices = []
    for name, d in table["devices"].items():
        head = "".join(f"{json.dumps(k)}: {json.dumps(v)}, " for k, v in d.items() if k != "entries")
        entries = ",\n".join("   " + json.dumps(e) for e in d.get("entries", []))
        devices.append(f'  {json.dumps(name)}: {{{head}"entries": [\n{entries}\n  ]}}')
    about = {k: v for k, v in table.items() if k != "devices"}
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in about.items()]
    return "{\n" + "\n".join(lines) + ('\n "devices": {\n' + ",\n".join(devices) + "\n }\n}\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--m", nargs="+", type=int, choices=M_VALUES, help="rows of x (default: all; smoke: 1 4)")
    p.add_argument("--reps", type=int, default=5, help="graph replays per timing (median)")
    p.add_argument("--budget-s", type=float, default=140.0,
                   help="time for the whole sweep; each shape gets its share and stops trying configs after it")
    p.add_argument("--write-table", action="store_true", help="write this GPU's entries into --table-path")
    p.add_argument("--table-path", type=Path, default=ROOT / "kernels" / "gemv_configs.json")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gemv_sweep.json")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU in the Triton interpreter")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Case]:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before loraplex.kernels.gemv_triton imports triton
        shapes, ms, grid, device, reps = SMOKE_SHAPES, args.m or [1, 4], SMOKE_GRID, "cpu", 1
        device_name = "cpu (smoke run, Triton interpreter: timings meaningless)"
    else:
        if not torch.cuda.is_available():
            sys.exit("gemv_sweep needs a CUDA GPU (or --cpu-smoke)")
        shapes, ms, grid, device, reps = {m: SHAPES[m] for m in args.models}, args.m or M_VALUES, GPU_GRID, "cuda", args.reps
        device_name = torch.cuda.get_device_name()
    print(HEADER, flush=True)
    t0 = time.perf_counter()
    cases, bandwidth = sweep(shapes, ms, grid, device, reps, args.budget_s)
    totals = step_totals(cases)
    print(f"\n{device_name}, {datetime.date.today()}, torch {torch.__version__}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, sweep {time.perf_counter() - t0:.0f} s\n")
    for t in totals:
        print(f"{t['model']} M={t['m']}: linear layers per decode step {t['cublas_us']:.0f} µs with cuBLAS, "
              f"{t['picked_us']:.0f} µs with the table's picks (saves {t['saved_us']:.0f} µs)")
    report = dict(device=device_name, date=str(datetime.date.today()), torch=torch.__version__,
                  copy_bandwidth_bytes_per_s=bandwidth, budget_s=args.budget_s, step_totals=totals,
                  cases=[asdict(c) for c in cases])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if os.environ.get("OUT") and not args.cpu_smoke:
        Path(os.environ["OUT"], "gemv_sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.write_table:
        write_table(cases, device_name, args.table_path)
        if os.environ.get("OUT") and not args.cpu_smoke:  # the device machine returns only $OUT
            Path(os.environ["OUT"], args.table_path.name).write_text(args.table_path.read_text())
    return cases


if __name__ == "__main__":
    main()
