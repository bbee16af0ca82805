"""Where an engine step's time goes, on a GPU: device kernels per decode step and host functions.

Random-weight Qwen3-0.6B shape, bf16, greedy, EOS ignored (the shape of bench/engine_throughput.py).
  kernels  decode at each --kernel-batches size under torch.profiler: every device kernel's count and time per step
           (CUDA-graph replays included), and the step's device-busy time against its wall time.
  host     cProfile of one ``generate`` call at each --batches size (128 in / 128 out): the host
           functions by own time, per engine step.
Prints tables; writes profile_engine.json to bench/results/ and $OUT.
  structured  both tables at batch 32 with every request under engine_throughput's JSON schema.
Usage: python bench/profile_engine.py [--what kernels,host,structured] [--batches 32,256] [--kernel-batches 1,256] [--tiny]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_throughput import (  # noqa: E402
    QWEN3_06B,
    STRUCTURED_SCHEMA,
    TINY,
    byte_tokenizer_copy,
    save,
    write_model,
)


def kernel_table(llm, batch: int, prompt_len: int, gen: int, rows: int = 30, structured: dict | None = None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from loraplex import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gen, min_tokens=gen, ignore_eos=True,
                            structured_outputs=structured)
    prompts = [[(i + j) % 200 + 1 for j in range(prompt_len)] for i in range(batch)]
    llm.generate(prompts, params)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        llm.generate(prompts, params)
        sync()
        wall = time.perf_counter() - t
    kernels = []
    for e in prof.key_averages():
        if e.self_device_time_total > 0 and e.device_type.name == "CUDA":
            kernels.append({"name": e.key[:90], "per_step": round(e.count / gen, 2),
                            "us_per_step": round(e.self_device_time_total / gen, 2),
                            "us_each": round(e.self_device_time_total / max(e.count, 1), 2)})
    kernels.sort(key=lambda k: -k["us_per_step"])
    busy = sum(k["us_per_step"] for k in kernels)
    launches = sum(k["per_step"] for k in kernels)
    print(f"\nbatch-{batch} (prompt {prompt_len}, {gen} generated; per step): wall {1e3 * wall / gen:.3f} ms/step (profiled), device busy {busy / 1e3:.3f} ms/step, "
          f"{launches:.0f} kernels/step")
    print(f"{'kernel':<90} {'n/step':>7} {'us/step':>8} {'us each':>8}")
    for k in kernels[:rows]:
        print(f"{k['name']:<90} {k['per_step']:>7} {k['us_per_step']:>8} {k['us_each']:>8}")
    return {"wall_ms_per_step": round(1e3 * wall / gen, 3), "busy_ms_per_step": round(busy / 1e3, 3),
            "kernels_per_step": round(launches, 1), "kernels": kernels[:rows]}


def host_table(llm, batch: int, prompt_len: int, gen: int, rows: int = 30, structured: dict | None = None) -> dict:
    from loraplex import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gen, min_tokens=gen, ignore_eos=True,
                            structured_outputs=structured)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 500, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    llm.generate(prompts[:4], params)
    sync()
    t = time.perf_counter()
    llm.generate(prompts, params)
    sync()
    plain = time.perf_counter() - t
    steps0 = llm.engine.stats.num_steps
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    llm.generate(prompts, params)
    sync()
    prof.disable()
    profiled = time.perf_counter() - t
    steps = llm.engine.stats.num_steps - steps0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(rows)
    print(f"\nhost, batch {batch} x {prompt_len}/{gen}: {steps} steps, {1e3 * plain / steps:.3f} ms/step unprofiled "
          f"({batch * gen / plain:.0f} tok/s), {1e3 * profiled / steps:.3f} ms/step under cProfile")
    print(buf.getvalue()[-6000:])
    top = [{"function": f"{Path(fn[0]).name}:{fn[1]}({fn[2]})", "calls": st[1],
            "own_ms_per_step": round(1e3 * st[2] / steps, 4), "cum_ms_per_step": round(1e3 * st[3] / steps, 4)}
           for fn, st in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:rows]]  # type: ignore[attr-defined]
    return {"batch": batch, "steps": steps, "ms_per_step": round(1e3 * plain / steps, 3),
            "tok_s": round(batch * gen / plain), "profiled_ms_per_step": round(1e3 * profiled / steps, 3), "top": top}


def free() -> None:
    """Gives a dropped engine's GPU memory back before the next one sizes its KV cache."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    from loraplex import LLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="kernels,host")
    ap.add_argument("--batches", default="32,256", help="host profile batch sizes")
    ap.add_argument("--kernel-batches", default="1,256", help="kernel profile batch sizes")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test of the script")
    args = ap.parse_args()
    shape, device, dtype = (TINY, "cpu", "float32") if args.tiny else (QWEN3_06B, "cuda", "bfloat16")
    gen = 8 if args.tiny else 128
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                 "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = write_model(Path(tmp), shape, device, 0)
        if "kernels" in args.what:
            for batch in map(int, args.kernel_batches.split(",")):
                llm = LLM(str(model), dtype=dtype, max_num_seqs=batch, enable_lora=False, max_model_len=2048,
                          max_num_batched_tokens=max(2048, batch * 128))
                res[f"kernels_b{batch}"] = kernel_table(llm, batch, 16 if batch == 1 else 128, gen)
                llm = None
                free()
        if "host" in args.what:
            for batch in map(int, args.batches.split(",")):
                llm = LLM(str(model), dtype=dtype, max_num_seqs=batch, enable_lora=False, max_model_len=1024,
                          max_num_batched_tokens=max(2048, batch * 128))
                res[f"host_b{batch}"] = host_table(llm, batch, 128 if not args.tiny else 8, gen)
                llm = None
                free()
        if "structured" in args.what:  # batch 32, every request under STRUCTURED_SCHEMA (byte-level tokenizer)
            llm = LLM(str(byte_tokenizer_copy(model)), dtype=dtype, max_num_seqs=32, enable_lora=False,
                      max_model_len=2048)
            schema = {"json": STRUCTURED_SCHEMA}
            res["structured_kernels_b32"] = kernel_table(llm, 32, 128, gen, structured=schema)
            res["structured_host_b32"] = host_table(llm, 32, 128, gen, structured=schema)
            llm = None
            free()
    save(res, "profile_engine.json")


if __name__ == "__main__":
    main()
