"""Paged attention of one decoder layer: the Triton kernels against the torch reference (bf16).

Decode: batch 1/8/32/128/256 x context 128..8k, every sequence at that context, Qwen3-0.6B heads
(16 query / 8 KV heads, head 128), block size 16, block tables in random order. The Triton time is
one CUDA-graph replay (how the engine runs decode), the torch reference's is eager; L2 is flushed
before each rep. The byte floor is each live token's K and V read once, over the device copy
bandwidth measured in this run (bytes read + written).
Prefill: fresh prompts and chunks over a cached prefix; TFLOP/s counts only the causal half.

    python bench/attention_kernels.py            # GPU; JSON to $OUT or bench/results/attention_kernels.json
    python bench/attention_kernels.py --sweep    # tuning: launch configs and split targets
    python bench/attention_kernels.py --sweep-splits    # tuning: decode split limits at small batches
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "kernels"))
from attention_cases import Step, make_step  # noqa: E402

from loraplex.kernels import attention_triton  # noqa: E402

HEADS = {"qwen3-0.6b": (16, 8, 128), "llama3-8b": (32, 8, 128)}
BATCHES, CONTEXTS = (1, 8, 32, 128, 256), (128, 512, 2048, 8192)
TORCH_MAX_TOKENS = 1 << 19  # the reference gathers every block: skip it above this many context tokens
PREFILLS = [  # (name, seq_lens, query_lens)
    ("1 x 2048 fresh", [2048], [2048]),
    ("4 x 1024 fresh", [1024] * 4, [1024] * 4),
    ("2 x 512 over 4k cached", [4608] * 2, [512] * 2),
    ("1 x 8192 fresh", [8192], [8192]),
    ("mixed: 512 chunk + 64 decodes at 4k", [1024] + [4096] * 64, [512] + [1] * 64),
]
FLUSH = torch.empty(0)  # L2 flush buffer, sized in main


def timed(fn: Callable[[], object], reps: int = 20) -> float:
    """Median microseconds, L2 flushed before each rep."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        FLUSH.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth() -> float:
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.int8, device="cuda"), torch.empty(n, dtype=torch.int8, device="cuda")
    return 2 * n / (timed(lambda: dst.copy_(src)) * 1e-6)


def triton_fn(step: Step, **kwargs) -> Callable[[], object]:
    qsl = step.query_start_loc
    return lambda: attention_triton.paged_attention(step.q, step.k_cache, step.v_cache, step.block_tables,
                                                    step.seq_lens, qsl, step.max_query_len, step.scale,
                                                    step.window, **kwargs)


def kv_bytes(step: Step) -> int:
    _, _, kv_heads, head_dim = step.k_cache.shape
    return int(step.seq_lens.sum()) * kv_heads * head_dim * 2 * step.k_cache.element_size()


def causal_flops(step: Step) -> float:
    heads, head_dim = step.q.shape[1], step.q.shape[2]
    total = 0
    for n, ql in zip(step.seq_lens.tolist(), step.query_lens.tolist(), strict=True):
        total += sum(n - ql + i + 1 for i in range(ql))
    return 4.0 * heads * head_dim * total


def decode_rows(model: str, bw: float, batches=BATCHES, contexts=CONTEXTS) -> list[dict]:
    heads, kv_heads, head_dim = HEADS[model]
    rows = []
    for batch in batches:
        for ctx in contexts:
            step = make_step([ctx] * batch, [1] * batch, heads, kv_heads, head_dim, 16, torch.bfloat16,
                             device="cuda")
            triton_us = timed(graphed(triton_fn(step)))
            torch_us = timed(functools.partial(step.run, "torch")) if batch * ctx <= TORCH_MAX_TOKENS else None
            floor_us = kv_bytes(step) / bw * 1e6
            rows.append(dict(model=model, batch=batch, context=ctx, triton_us=triton_us, torch_us=torch_us,
                             floor_us=floor_us, pct_of_floor=100 * floor_us / triton_us,
                             splits=attention_triton.num_splits(batch, kv_heads, ctx)))
            print(_fmt_decode(rows[-1]), flush=True)
            del step
    return rows


def prefill_rows(model: str) -> list[dict]:
    heads, kv_heads, head_dim = HEADS[model]
    rows = []
    for name, seq_lens, query_lens in PREFILLS:
        step = make_step(seq_lens, query_lens, heads, kv_heads, head_dim, 16, torch.bfloat16, device="cuda")
        triton_us = timed(triton_fn(step))
        torch_us = timed(functools.partial(step.run, "torch"))
        flops = causal_flops(step)
        rows.append(dict(model=model, case=name, triton_us=triton_us, torch_us=torch_us,
                         triton_tflops=flops / triton_us * 1e-6, torch_tflops=flops / torch_us * 1e-6))
        print(f"| {model} | {name} | {triton_us:.0f} | {torch_us:.0f} | {rows[-1]['triton_tflops']:.0f} "
              f"| {rows[-1]['torch_tflops']:.0f} |", flush=True)
    return rows


def _fmt_decode(r: dict) -> str:
    torch_us = f"{r['torch_us']:.0f}" if r["torch_us"] is not None else "-"
    return (f"| {r['model']} | {r['batch']} | {r['context']} | {r['splits']} | {r['triton_us']:.1f} | {torch_us} "
            f"| {r['floor_us']:.1f} | {r['pct_of_floor']:.0f}% |")


def sweep_splits() -> list[dict]:
    """Decode split-count limits at small batches, where splitting decides the time."""
    results = []
    heads, kv_heads, head_dim = HEADS["qwen3-0.6b"]
    cases = [(b, c) for b in (1, 8) for c in (256, 512, 1024, 2048, 8192, 32768)]
    steps = {c: make_step([c[1]] * c[0], [1] * c[0], heads, kv_heads, head_dim, 16, torch.bfloat16, device="cuda")
             for c in cases}
    default = attention_triton.MIN_SPLIT_TOKENS, attention_triton.MAX_SPLITS
    for min_tokens in (64, 128, 256, 512, 1024):
        for max_splits in (16, 32, 64, 128):
            attention_triton.MIN_SPLIT_TOKENS, attention_triton.MAX_SPLITS = min_tokens, max_splits
            row: dict[str, Any] = dict(kind="splits", min_split_tokens=min_tokens, max_splits=max_splits)
            for c, step in steps.items():
                row[f"{c[0]}x{c[1]}"] = round(timed(graphed(triton_fn(step)), reps=10), 1)
            print(json.dumps(row), flush=True)
            results.append(row)
    attention_triton.MIN_SPLIT_TOKENS, attention_triton.MAX_SPLITS = default
    return results


def sweep() -> list[dict]:
    """Decode and prefill launch configs on representative cases; split targets for decode."""
    results = []
    heads, kv_heads, head_dim = HEADS["qwen3-0.6b"]
    decode_cases = [(1, 8192), (32, 2048), (128, 8192), (256, 512)]
    steps = {c: make_step([c[1]] * c[0], [1] * c[0], heads, kv_heads, head_dim, 16, torch.bfloat16, device="cuda")
             for c in decode_cases}
    default = dict(attention_triton.DECODE)
    for block_n in (32, 64, 128):
        for warps in (2, 4, 8):
            for stages in (2, 3, 4):
                attention_triton.DECODE.update(block_n=block_n, warps=warps, stages=stages)
                row: dict[str, Any] = dict(kind="decode", block_n=block_n, warps=warps, stages=stages)
                for c, step in steps.items():
                    row[f"{c[0]}x{c[1]}"] = timed(graphed(triton_fn(step)), reps=10)
                print(json.dumps(row), flush=True)
                results.append(row)
    attention_triton.DECODE.update(default)
    for target in (128, 256, 512, 1024, 2048):
        attention_triton.TARGET_PROGRAMS = target
        row2: dict[str, Any] = dict(kind="decode_target", target=target)
        for c, step in steps.items():
            row2[f"{c[0]}x{c[1]}"] = timed(graphed(triton_fn(step)), reps=10)
        print(json.dumps(row2), flush=True)
        results.append(row2)
    del steps
    prefill = make_step([4096] * 2, [2048] * 2, heads, kv_heads, head_dim, 16, torch.bfloat16, device="cuda")
    default = dict(attention_triton.PREFILL)
    for block_m in (64, 128):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    attention_triton.PREFILL.update(block_m=block_m, block_n=block_n, warps=warps, stages=stages)
                    us: float | str
                    try:
                        us = timed(triton_fn(prefill), reps=10)
                    except Exception as exc:  # out of shared memory for this config
                        us = f"failed: {type(exc).__name__}"
                    row3 = dict(kind="prefill", block_m=block_m, block_n=block_n, warps=warps, stages=stages,
                               us_2x2048_over_2k=us)
                    print(json.dumps(row3), flush=True)
                    results.append(row3)
    attention_triton.PREFILL.update(default)
    return results


def main() -> None:
    global FLUSH
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="tuning sweep of launch configs")
    parser.add_argument("--sweep-splits", action="store_true", help="tuning sweep of decode split limits")
    parser.add_argument("--models", default="qwen3-0.6b,llama3-8b")
    args = parser.parse_args()
    FLUSH = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    if args.sweep_splits:
        with open(os.path.join(out_dir, "attention_kernels_splits.json"), "w") as f:
            json.dump(sweep_splits(), f, indent=1)
        return
    if args.sweep:
        with open(os.path.join(out_dir, "attention_kernels_sweep.json"), "w") as f:
            json.dump(sweep(), f, indent=1)
        return
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}, {datetime.date.today()}, torch {torch.__version__}, copy {bw / 1e12:.2f} TB/s (read+write)")
    print("\n| model | batch | context | splits | triton us (graph) | torch us | floor us | % of floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    models = args.models.split(",")
    decode = decode_rows(models[0], bw)
    for model in models[1:]:
        decode += decode_rows(model, bw, batches=(1, 32, 128), contexts=(2048, 8192))
    print("\n| model | prefill | triton us | torch us | triton TFLOP/s | torch TFLOP/s |\n| --- | --- | --- | --- | --- | --- |")
    prefill = [r for m in models for r in prefill_rows(m)]
    report = dict(device=device, date=str(datetime.date.today()), torch=torch.__version__,
                  copy_bandwidth_bytes_per_s=bw, decode=decode, prefill=prefill)
    with open(os.path.join(out_dir, "attention_kernels.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
