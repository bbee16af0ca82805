"""Host time per engine step that LoRA adds: LoRA off, LoRA on but idle, 1, 8 and 32 adapters.

A tiny random Qwen3 (engine_throughput.TINY, float32 on CPU) and 32 random rank-8 PEFT adapters on
all 7 projections. At each batch size (--batches, default 32 and 256), a decode-dominated workload
(8-token prompts, 64 generated, greedy, EOS ignored, one ``generate`` call) runs on:
  off     an engine with enable_lora=False
  idle    an engine with LoRA on (32 adapters registered and resident), every request on the base model
  1       the same engine, every request on one adapter
  8, 32   the same engine, requests round-robin over 8 / 32 distinct adapters
Per case: wall ms/step (best of --repeats unprofiled runs) and the host ms/step under cProfile
(the least of --repeats profiled runs: the machine may be shared), grouped by file, with Python
calls per step (exact, unlike times). Host time counts the own time of Python functions outside torch and outside
kernels/lora_torch.py (the CPU stand-in for the LoRA kernels), plus the time of the non-torch
builtins they call (numpy, dict, list...); torch ops called from those files are kernel time on a
CPU, and are reported apart as calls per step (on a GPU each is a launch or a copy).
Prints a table; writes bench/results/lora_host_overhead.json (--results-dir, --out; and $OUT/ when set).
Usage: python bench/lora_host_overhead.py [--batches 32,256] [--gen 64] [--repeats 2] [--cases off,idle,1,8,32]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_throughput import TINY, write_model  # noqa: E402

CASES = ("off", "idle", "1", "8", "32")
RANK = 8
PROMPT = 8
ROOT = Path(__file__).resolve().parents[1]
TORCH_DIR = str(Path(torch.__file__).parent)
_TYPE_METHOD = re.compile(r"<built-in method \w+ of type object at (0x[0-9a-f]+)>")
_TORCH_MODULES = (torch._C._nn, torch._C._linalg, torch._C._special, torch._C._fft)
_TORCH_FUNCTIONS = {name for m in _TORCH_MODULES for name in dir(m)}
FORWARD_DIRS = ("backend/models/", "backend/layers/", "kernels/")
STEP_FUNCTIONS = {"build", "_host_slots"}  # kernels/lora.py functions run once per step, outside the forward


def group_of(filename: str, function: str = "") -> str | None:
    """The file group a function is counted under; None for kernel time (torch, the LoRA torch reference).
    LoRABatchMeta.build (kernels/lora.py) is counted apart from the per-layer LoRA wrappers of that file."""
    if filename.startswith(TORCH_DIR) or filename.endswith("kernels/lora_torch.py"):
        return None
    path = Path(filename).resolve()
    if path.is_relative_to(ROOT):
        rel = str(path.relative_to(ROOT))
        return f"{rel}:{function}" if rel == "kernels/lora.py" and function in STEP_FUNCTIONS else rel
    if "numpy" in path.parts:
        return "numpy"
    if "site-packages" in path.parts:
        return f"site-packages/{path.parts[path.parts.index('site-packages') + 1]}"
    return "stdlib" if filename.startswith("/") else filename


def in_forward(group: str) -> bool:
    """Python of the model's forward (layers, kernel wrappers): inside the CUDA graph of a GPU decode step."""
    return group.startswith(FORWARD_DIRS) and ":" not in group and group != "kernels/lora_plan.py"


def is_torch_op(label: str) -> bool:
    """A builtin of torch (a tensor method, torch.xxx, torch.nn.functional's C functions)."""
    if "torch" in label or "Tensor" in label:
        return True
    m = _TYPE_METHOD.match(label)
    if m and int(m.group(1), 16) == id(torch._C._VariableFunctionsClass):
        return True
    m = re.match(r"<built-in function (\w+)>", label)
    return bool(m and m.group(1) in _TORCH_FUNCTIONS)


def host_by_file(prof: cProfile.Profile, steps: int) -> dict[str, Any]:
    """Host ms/step by file group, and the torch ops those files call (calls and ms per step)."""
    stats: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    own: dict[str, float] = defaultdict(float)
    calls: dict[str, float] = defaultdict(float)
    torch_calls: dict[str, float] = defaultdict(float)
    torch_ms: dict[str, float] = defaultdict(float)
    for (filename, _line, name), (_cc, nc, tt, _ct, callers) in stats.items():
        if filename != "~":
            group = group_of(filename, name)
            if group is not None:
                own[group] += tt
                calls[group] += nc
            continue
        torch_op = is_torch_op(name)
        for (cfile, _cline, cname), (_ccc, cnc, ctt, _cct) in callers.items():
            group = group_of(cfile, cname) if cfile != "~" else None
            if group is None:
                continue
            if torch_op:
                torch_calls[group] += cnc
                torch_ms[group] += ctt
            else:
                own[group] += ctt
                calls[group] += cnc
    per = 1e3 / steps
    forward = sum(v for g, v in own.items() if in_forward(g))
    return {"host_ms_per_step": round(sum(own.values()) * per, 4),
            "step_ms_per_step": round((sum(own.values()) - forward) * per, 4),
            "forward_ms_per_step": round(forward * per, 4),
            "calls_per_step": round(sum(calls.values()) / steps, 1),
            "step_calls_per_step": round(sum(v for g, v in calls.items() if not in_forward(g)) / steps, 1),
            "calls_by_file": {g: round(v / steps, 1) for g, v in sorted(calls.items(), key=lambda kv: -kv[1])},
            "by_file": {g: round(v * per, 4) for g, v in sorted(own.items(), key=lambda kv: -kv[1])},
            "torch_calls_per_step": round(sum(torch_calls.values()) / steps, 1),
            "torch_calls_by_file": {g: round(v / steps, 1) for g, v in sorted(torch_calls.items(),
                                                                                key=lambda kv: -kv[1])},
            "torch_ms_per_step": round(sum(torch_ms.values()) * per, 4)}


def names_for(case: str, batch: int) -> list[str | None]:
    if case in ("off", "idle"):
        return [None] * batch
    n = int(case)
    return [f"a{i % n}" for i in range(batch)]


def measure(llm: Any, case: str, batch: int, gen: int, repeats: int) -> dict[str, Any]:
    from loraplex import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gen, min_tokens=gen, ignore_eos=True)
    prompts = [[(7 * i + j) % 200 + 1 for j in range(PROMPT)] for i in range(batch)]
    names = names_for(case, batch)
    engine = llm.engine
    llm.generate(prompts, params, adapters=names)  # warm-up: adapters into their slots
    walls = []
    steps = 0
    for _ in range(repeats):
        steps0, t = engine.stats.num_steps, time.perf_counter()
        llm.generate(prompts, params, adapters=names)
        walls.append(time.perf_counter() - t)
        steps = engine.stats.num_steps - steps0
    profiles = []
    for _ in range(repeats):  # the least disturbed of several (the machine may be shared)
        prof = cProfile.Profile()
        steps0 = engine.stats.num_steps
        prof.enable()
        llm.generate(prompts, params, adapters=names)
        prof.disable()
        profiles.append(host_by_file(prof, engine.stats.num_steps - steps0))
    res = {"batch": batch, "case": case, "steps": steps, "wall_ms_per_step": round(1e3 * min(walls) / steps, 3)}
    res.update(min(profiles, key=lambda p: p["host_ms_per_step"]))
    return res


def make_llm(model: Path, batch: int, lora: bool, adapters: list[Path], device: str) -> Any:
    from loraplex import LLM
    from loraplex.backend.layers.lora import LoRALinear

    LoRALinear.warm_kernels = device == "cuda"
    llm = LLM(str(model), dtype="float32" if device == "cpu" else "bfloat16", device=device, max_num_seqs=batch,
              enable_lora=lora, max_loras=len(adapters), max_lora_rank=RANK, max_cpu_loras=len(adapters),
              max_model_len=256, max_num_batched_tokens=max(2048, batch * PROMPT), seed=0,
              adapter_roots=[str(model.parent)])
    if lora:
        for i, path in enumerate(adapters):
            llm.load_adapter(f"a{i}", path)
    return llm


def table(results: list[dict[str, Any]], rows: int) -> str:
    lines = []
    for batch in sorted({r["batch"] for r in results}):
        rs = [r for r in results if r["batch"] == batch]
        files: dict[str, float] = defaultdict(float)
        for r in rs:
            for f, v in r["by_file"].items():
                files[f] = max(files[f], v)
        head = f"{'batch ' + str(batch) + ' (ms/step)':<44}" + "".join(f"{r['case']:>9}" for r in rs)
        lines += ["", head, "-" * len(head)]
        lines.append(f"{'wall (unprofiled)':<44}" + "".join(f"{r['wall_ms_per_step']:>9.3f}" for r in rs))
        lines.append(f"{'host under cProfile':<44}" + "".join(f"{r['host_ms_per_step']:>9.3f}" for r in rs))
        lines.append(f"{'  outside the forward (engine, LoRA meta)':<44}"
                     + "".join(f"{r['step_ms_per_step']:>9.3f}" for r in rs))
        lines.append(f"{'  forward (model, layers, kernel wrappers)':<44}"
                     + "".join(f"{r['forward_ms_per_step']:>9.3f}" for r in rs))
        lines.append(f"{'python calls/step':<44}" + "".join(f"{r['calls_per_step']:>9.0f}" for r in rs))
        lines.append(f"{'  outside the forward':<44}" + "".join(f"{r['step_calls_per_step']:>9.0f}" for r in rs))
        lines.append(f"{'torch ops from host code, calls/step':<44}"
                     + "".join(f"{r['torch_calls_per_step']:>9.0f}" for r in rs))
        for f, _ in sorted(files.items(), key=lambda kv: -kv[1])[:rows]:
            tag = "(fwd) " if in_forward(f) else ""
            lines.append(f"  {(tag + f)[-42:]:<42}" + "".join(f"{r['by_file'].get(f, 0.0):>9.3f}" for r in rs))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--gen", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--repeats", type=int, default=2, help="unprofiled and profiled runs per case (best)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rows", type=int, default=18, help="files shown per batch size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="lora_host_overhead.json")
    ap.add_argument("--results-dir", default=str(Path(__file__).parent / "results"), help="where --out goes ($OUT too)")
    args = ap.parse_args()
    cases = args.cases.split(",")
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = write_model(Path(tmp), TINY, "cpu", max(int(c) for c in [*cases, "1"] if c.isdigit()),
                                      rank=RANK)
        for batch in map(int, args.batches.split(",")):
            if "off" in cases:
                results.append(measure(make_llm(model, batch, False, adapters, args.device), "off", batch,
                                       args.gen, args.repeats))
            on = [c for c in cases if c != "off"]
            if on:
                llm = make_llm(model, batch, True, adapters, args.device)
                results += [measure(llm, c, batch, args.gen, args.repeats) for c in on]
                del llm
    res = {"device": args.device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "prompt": PROMPT, "gen": args.gen, "rank": RANK, "seconds": round(time.perf_counter() - t0, 1),
           "results": results}
    print(table(results, args.rows))
    for folder in filter(None, (os.environ.get("OUT"), args.results_dir)):
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
