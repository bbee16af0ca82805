"""Where an engine step's time goes, on a GPU: device kernels per decode step and host functions.

Random-weight Qwen3-0.6B shape, bf16, greedy, EOS ignored (the shape of bench/engine_throughput.py).
  kernels  decode at each --kernel-batches size under torch.profiler: every device kernel's count and time per step
           (CUDA-graph replays included), and the step's device-busy time against its wall time.
  host     cProfile of one ``generate`` call at each --batches size (128 in / 128 out): the host
           functions by own time, per engine step.
Prints tables; writes profile_engine.json to bench/results/ and $OUT.
  structured  both tables at batch 32 with every request under engine_throughput's JSON schema.
  nano     the nano-vllm workload (256 requests, lengths uniform in [100, 1024]) once per --budgets token
           budget: every step's wall time by kind (decode in a graph, eager decode, mixed prefill+decode,
           prefill only) beside its byte floor, preemptions, and device kernels of a few decode and mixed steps.
Usage: python bench/profile_engine.py [--what kernels,host,structured,nano] [--batches 32,256] [--kernel-batches 1,256]
       [--budgets 2048,16384] [--tiny]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
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
    top = top_functions(prof, steps, rows)
    return {"batch": batch, "steps": steps, "ms_per_step": round(1e3 * plain / steps, 3),
            "tok_s": round(batch * gen / plain), "profiled_ms_per_step": round(1e3 * profiled / steps, 3), "top": top}


HOST_SAMPLE = 8  # steps of each kind under cProfile in step_trace


def top_functions(prof: cProfile.Profile, steps: int, rows: int) -> list[dict]:
    """The ``rows`` functions with the most own time, per step."""
    stats = pstats.Stats(prof)
    return [{"function": f"{Path(fn[0]).name}:{fn[1]}({fn[2]})", "calls": st[1],
             "calls_per_step": round(st[1] / steps, 1),
             "own_ms_per_step": round(1e3 * st[2] / steps, 4), "cum_ms_per_step": round(1e3 * st[3] / steps, 4)}
            for fn, st in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:rows]]  # type: ignore[attr-defined]


def step_trace(llm, prompts: list[list[int]], outputs: list[int], kv_per_token: int, weight_bytes: int,
               bw: float, windows: dict[str, int]) -> dict:
    """Runs one ``generate`` with every runner launch timed; the wall time of step i is the gap between
    the starts of launches i and i+1 (with async scheduling that is the device's time once it is the
    bottleneck). Kernel tables come from torch.profiler over the first steps of each kind in ``windows``."""
    from torch.profiler import ProfilerActivity, profile

    from loraplex import SamplingParams

    runner = llm.engine.runner
    launch = runner.launch
    steps: list[dict] = []
    prof_state: dict = {"prof": None, "kind": None, "left": 0, "tables": {}}

    def kind_of(out) -> str:
        n_tok = sum(r.num_new_tokens for r in out.requests)
        if n_tok == len(out.requests):
            fits = runner.graphs is not None and runner.graphs.fits(len(out.requests))
            return "decode_graph" if fits else "decode_eager"
        step = runner.step_graphs is not None and n_tok <= runner.step_graphs.buckets[-1]
        return ("mixed" if any(r.num_new_tokens == 1 for r in out.requests) else "prefill") + ("_graph" if step else "")

    def close_window() -> None:
        p = prof_state["prof"]
        if p is None:
            return
        sync()
        p.__exit__(None, None, None)
        k = prof_state["kind"]
        n = windows[k]
        rows = []
        for e in p.key_averages():
            if e.self_device_time_total > 0 and e.device_type.name == "CUDA":
                rows.append({"name": e.key[:80], "per_step": round(e.count / n, 1),
                             "us_per_step": round(e.self_device_time_total / n, 1)})
        rows.sort(key=lambda r: -r["us_per_step"])
        prof_state["tables"][k] = {"busy_ms_per_step": round(sum(r["us_per_step"] for r in rows) / 1e3, 3),
                                   "kernels": rows[:20]}
        prof_state["prof"] = None

    def timed(out, *a, **kw):
        kind = kind_of(out) if out.requests else "empty"
        if prof_state["prof"] is not None:
            prof_state["left"] -= 1
            if prof_state["left"] <= 0:
                close_window()
        skip = len(steps) > 4  # the first steps compile and warm
        if (prof_state["prof"] is None and skip and kind in windows and kind not in prof_state["tables"]
                and torch.cuda.is_available()):
            prof_state["prof"] = profile(activities=[ProfilerActivity.CUDA])
            prof_state["prof"].__enter__()
            prof_state["kind"], prof_state["left"] = kind, windows[kind]
        ctx = sum(int(r.start) + r.num_new_tokens for r in out.requests)
        step = {"t": time.perf_counter(), "kind": kind, "rows": len(out.requests),
                "tokens": sum(r.num_new_tokens for r in out.requests), "ctx": ctx,
                "profiled": prof_state["prof"] is not None}
        steps.append(step)
        host = host_profiles.get(kind)
        sample = host is not None and host[1] < HOST_SAMPLE and not step["profiled"] and len(steps) > 4
        if sample:
            host[0].enable()
        t = time.perf_counter()
        handle = launch(out, *a, **kw)
        step["launch_s"] = time.perf_counter() - t
        if sample:
            host[0].disable()
            host[1] += 1
        return handle

    # cProfile inside runner.launch (the host's part of building and launching a step) for a few
    # steps of each kind: where an eager step's host time goes
    host_profiles: dict[str, list] = {k: [cProfile.Profile(), 0] for k in ("mixed", "prefill", "decode_graph",
                                                                          "mixed_graph", "prefill_graph")}
    runner.launch = timed
    params = [SamplingParams(temperature=0.0, max_tokens=o, min_tokens=o, ignore_eos=True) for o in outputs]
    preempt0 = llm.engine.stats.preemptions
    sync()
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    sync()
    wall = time.perf_counter() - t0
    close_window()
    runner.launch = launch
    ends = [s["t"] for s in steps[1:]] + [t0 + wall]
    kinds: dict[str, dict] = {}
    for s, end in zip(steps, ends, strict=True):
        if s["profiled"]:
            continue
        k = kinds.setdefault(s["kind"], {"steps": 0, "seconds": 0.0, "floor_s": 0.0, "rows": 0, "tokens": 0,
                                         "launch_s": 0.0})
        k["steps"] += 1
        k["seconds"] += end - s["t"]
        k["launch_s"] += s["launch_s"]
        k["floor_s"] += (weight_bytes + kv_per_token * s["ctx"]) / bw
        k["rows"] += s["rows"]
        k["tokens"] += s["tokens"]
    for k in kinds.values():
        k["ms_per_step"] = round(1e3 * k["seconds"] / k["steps"], 3)
        k["floor_ms_per_step"] = round(1e3 * k["floor_s"] / k["steps"], 3)
        k["pct_of_floor"] = round(100 * k["floor_s"] / k["seconds"], 1)
        k["mean_rows"] = round(k["rows"] / k["steps"], 1)
        k["mean_tokens"] = round(k["tokens"] / k["steps"], 1)
        k["launch_ms_per_step"] = round(1e3 * k.pop("launch_s") / k["steps"], 3)
        k["seconds"], k["floor_s"] = round(k["seconds"], 3), round(k["floor_s"], 3)
    res = {"seconds": round(wall, 2), "output_tok_s": round(sum(outputs) / wall, 1), "steps": len(steps),
           "by_kind": kinds, "kernels": prof_state["tables"]}
    res["preemptions"] = llm.engine.stats.preemptions - preempt0
    # decode steps by batch size, in buckets: where the time of the long tail of small batches goes
    buckets: dict[str, list[float]] = {}
    for s, end in zip(steps, ends, strict=True):
        if s["kind"].startswith("decode") and not s["profiled"]:
            b = next(x for x in (1, 8, 32, 64, 128, 192, 256, 1 << 30) if s["rows"] <= x)
            v = buckets.setdefault(f"<={b}", [0, 0.0, 0.0])
            v[0] += 1
            v[1] += end - s["t"]
            v[2] += (weight_bytes + kv_per_token * s["ctx"]) / bw
    res["decode_by_rows"] = {b: {"steps": n, "ms_per_step": round(1e3 * t / n, 3), "floor_ms": round(1e3 * f / n, 3)}
                             for b, (n, t, f) in sorted(buckets.items(), key=lambda kv: int(kv[0][2:]))}
    print(f"  {wall:.2f} s, {res['output_tok_s']} tok/s, {len(steps)} steps"
          + f", {res['preemptions']} preemptions")
    print(f"  {'kind':<14} {'steps':>6} {'seconds':>8} {'ms/step':>8} {'floor ms':>9} {'% floor':>8} {'rows':>6} "
          f"{'tokens':>7} {'launch ms':>9}")
    for name, k in sorted(kinds.items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"  {name:<14} {k['steps']:>6} {k['seconds']:>8} {k['ms_per_step']:>8} {k['floor_ms_per_step']:>9} "
              f"{k['pct_of_floor']:>8} {k['mean_rows']:>6} {k['mean_tokens']:>7} {k['launch_ms_per_step']:>9}")
    for b, v in res["decode_by_rows"].items():
        print(f"  decode rows {b:<8} {v['steps']:>5} steps {v['ms_per_step']:>8} ms/step (floor {v['floor_ms']})")
    res["host_in_launch"] = {}
    for name, (prof, n) in host_profiles.items():
        if n:
            top = top_functions(prof, n, 15)
            res["host_in_launch"][name] = {"steps": n, "top": top}
            print(f"  host inside launch, {n} {name} steps (cProfile, ms per step by own time):")
            for r in top:
                print(f"    {r['function']:<80} {r['calls_per_step']:>7} {r['own_ms_per_step']:>8}")
    for name, tab in prof_state["tables"].items():
        print(f"  kernels of {windows[name]} {name} steps: device busy {tab['busy_ms_per_step']} ms/step")
        for r in tab["kernels"][:12]:
            print(f"    {r['name']:<80} {r['per_step']:>6} {r['us_per_step']:>9}")
    return res


def nano_workload(num: int, max_len: int, seed: int = 0, min_len: int = 100) -> tuple[list[list[int]], list[int]]:
    """The nano-vllm workload's requests (../shared/bench/nano_vllm_workload.py draws them the same way)."""
    import random

    rng = random.Random(seed)
    prompts = [rng.randint(min_len, max_len) for _ in range(num)]
    outputs = [rng.randint(min_len, max_len) for _ in range(num)]
    ids = [[rng.randint(1, 500) for _ in range(p)] for p in prompts]
    return ids, outputs


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
    ap.add_argument("--budgets", default="2048,16384", help="nano: max_num_batched_tokens values")
    ap.add_argument("--nano-num", type=int, default=256, help="nano: requests")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test of the script")
    ap.add_argument("--out", default="profile_engine.json", help="JSON file name (bench/results and $OUT)")
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
        if "nano" in args.what:
            from floors import copy_bandwidth, kv_bytes_per_token, weight_bytes

            num, max_len = (8, 40) if args.tiny else (args.nano_num, 1024)
            prompts, outputs = nano_workload(num, max_len, min_len=10 if args.tiny else 100)
            bw = copy_bandwidth() if device == "cuda" else 50e9
            kv_per_token = kv_bytes_per_token(shape)  # bf16 (the tiny fp32 run's floor is only indicative)
            budgets = [int(b) for b in args.budgets.split(",")]
            if len(budgets) > 1 and device == "cuda":
                # one process per budget: an engine's GPU memory is not all given back within a process,
                # and the next engine would size its KV cache from what is left (and preempt all along)
                for budget in budgets:
                    subprocess.run([sys.executable, __file__, "--what", "nano", "--budgets", str(budget),
                                    "--nano-num", str(num), "--out", f"profile_nano_{budget}.json"], check=False)
                budgets = []
            for budget in budgets:
                llm = LLM(str(model), dtype=dtype, max_num_seqs=num, enable_lora=False, max_model_len=2 * max_len + 16,
                          max_num_batched_tokens=max(budget, 2 * max_len + 16))
                llm.generate(prompts[:8], None)  # compiles
                kv_tokens = llm.engine.kv.num_blocks * llm.engine.kv.block_size
                print(f"\nnano-vllm workload, max_num_batched_tokens={budget}, KV cache {kv_tokens} tokens:")
                res[f"nano_budget{budget}"] = step_trace(llm, prompts, outputs, kv_per_token,
                                                         weight_bytes(shape), bw,
                                                         {"decode_graph": 6, "mixed": 4, "mixed_graph": 4})
                llm = None
                free()
    save(res, args.out)


if __name__ == "__main__":
    main()
