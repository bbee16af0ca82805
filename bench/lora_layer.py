"""LoRA's cost inside decode steps, at the layer level: the four LoRA-wrapped projections of every
decoder layer (base GEMM + LoRA, LoRALinear as the engine runs it) of Qwen3-0.6B / Llama-3-8B
shapes, captured in one CUDA graph per variant, bf16, rank 16, 64 slots:

  base           no adapter rows (LoRA skipped), the floor to compare with
  bgmv           BGMV as the decode graphs capture it (LoRABatchMeta with slots only on the device),
                 LoRALinear.mode "serial": shrink and expand kernels in line
  bgmv+overlap   mode "overlap": the shrink on a side stream beside the base GEMM
  bgmv+fused     mode "fused": shrink and expand in one kernel
  sgmv           SGMV with its tile table built on the device inside the graph (16-row tiles)
  sgmv+overlap, sgmv+fused

for decode batches of T tokens on 1 adapter or T distinct ones. Prints µs per layer and LoRA's
overhead in % of the base layer; JSON to --out (default bench/results/) and $OUT.

    python bench/lora_layer.py [--models qwen3-0.6b,llama3-8b] [--tokens 1,8,32,64,128]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, q, kv, layers
    "qwen3-0.6b": (1024, 3072, 2048, 1024, 28),
    "llama3-8b": (4096, 14336, 4096, 1024, 32),
}
RANK, SLOTS = 16, 64
VARIANTS = ("base", "bgmv", "bgmv+overlap", "bgmv+fused", "sgmv", "sgmv+overlap", "sgmv+fused")


def make_layers(hidden: int, inter: int, q: int, kv: int, num_layers: int) -> list[list]:
    from loraplex.backend.layers.lora import LoRALinear

    dims = [(hidden, (q, kv, kv)), (q, (hidden,)), (hidden, (inter, inter)), (inter, (hidden,))]
    layers = []
    for _ in range(num_layers):
        mods = []
        for h_in, outs in dims:
            m = LoRALinear(h_in, outs, dtype=torch.bfloat16).cuda()
            m.weight.data.normal_(std=h_in**-0.5)
            a = (torch.randn(SLOTS, len(outs) * RANK, h_in, device="cuda") / h_in**0.5).bfloat16()
            b = (torch.randn(SLOTS, sum(outs), RANK, device="cuda") / RANK**0.5).bfloat16()
            m.set_lora(a, b, torch.full((SLOTS,), 2.0, device="cuda"))
            mods.append(m)
        layers.append(mods)
    return layers


def run_layers(layers: list[list], inputs: dict[int, torch.Tensor]) -> None:
    for mods in layers:
        for m in mods:
            m(inputs[m.in_features])


@torch.inference_mode()
def graph_us(layers: list[list], inputs: dict[int, torch.Tensor], variant: str, slots: torch.Tensor,
             reps: int) -> float:
    """Median µs per decoder layer of one replay of all layers under ``variant``."""
    from loraplex.backend.layers.context import ForwardContext, forward_context
    from loraplex.backend.layers.lora import LoRALinear
    from loraplex.kernels.lora import LoRABatchMeta, LoRAPlan

    def meta() -> LoRABatchMeta | None:
        if variant == "base":
            return None
        return LoRABatchMeta.on_device(slots, LoRAPlan("sgmv", 16) if variant.startswith("sgmv") else None)

    default = LoRALinear.mode
    LoRALinear.mode = "fused" if variant.endswith("+fused") else "overlap" if variant.endswith("+overlap") else "serial"
    try:
        with forward_context(ForwardContext(None, meta())):  # type: ignore[arg-type]  # LoRA reads only .lora
            run_layers(layers, inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), forward_context(ForwardContext(None, meta())):  # type: ignore[arg-type]
            run_layers(layers, inputs)
    finally:
        LoRALinear.mode = default
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(layers))
    return statistics.median(times)


def bench_model(model: str, token_counts: list[int], reps: int) -> list[dict]:
    hidden, inter, q, kv, num_layers = SHAPES[model]
    layers = make_layers(hidden, inter, q, kv, num_layers)
    rows = []
    for tokens in token_counts:
        inputs = {d: torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16) for d in {hidden, q, inter}}
        for distinct in sorted({1, min(tokens, SLOTS)}):
            slots = torch.tensor([t % distinct * 7 % SLOTS for t in range(tokens)], dtype=torch.int32, device="cuda")
            row: dict = dict(model=model, tokens=tokens, distinct=distinct)
            for v in VARIANTS:
                row[v] = round(graph_us(layers, inputs, v, slots, reps), 2)
            for v in VARIANTS[1:]:
                row[f"{v} overhead %"] = round(100 * (row[v] - row["base"]) / row["base"], 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    del layers
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--tokens", default="1,8,32,64,128")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/lora_layer.py needs a CUDA GPU")
    rows = []
    for model in args.models.split(","):
        rows += bench_model(model, [int(t) for t in args.tokens.split(",")], args.reps)
    print(f"\n{torch.cuda.get_device_name()}, {datetime.date.today()}: µs per decoder layer (4 LoRA-wrapped "
          f"projections), decode graph; overhead = LoRA's share over base\n")
    print("| model | tokens | adapters | base | " + " | ".join(VARIANTS[1:]) + " |\n|" + " --- |" * (3 + len(VARIANTS)))
    for r in rows:
        cells = " | ".join(f"{r[v]:.1f} (+{r[f'{v} overhead %']:.0f}%)" for v in VARIANTS[1:])
        print(f"| {r['model']} | {r['tokens']} | {r['distinct']} | {r['base']:.1f} | {cells} |")
    report = dict(device=torch.cuda.get_device_name(), date=str(datetime.date.today()), rank=RANK, slots=SLOTS,
                  rows=rows)
    for d in {args.out, os.environ.get("OUT") or args.out}:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "lora_layer.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
