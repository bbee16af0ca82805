"""The served path against the engine alone, same machine, same model, same workload, one run.

Engine alone: ``LLM.generate`` of N requests (P token ids in, G out, greedy, EOS ignored).
Served: a real ``loraplex serve`` (engine core in its own process; ``--in-process`` adds the core on
a thread of the server) and N concurrent streaming gRPC ``Generate`` calls, shared by ``--clients``
client processes.

Reports tok/s of both and their ratio; the inter-token latency (ITL: the gap between a stream's
consecutive messages, as vLLM's benchmark counts it) p50/p99 and tokens per message; and the CPU
time each process spent per generated token (server front end, engine core, this client), read
from /proc, which a busy machine skews less than it skews tok/s. ``1e6 / front_end_cpu_us_per_token``
is the tokens/s one front-end core can stream.

The default model is runnable on a CPU: a random 2-layer, hidden-64 Qwen3 with the demo model's
byte-level tokenizer (272 tokens), whose engine steps are short, so the front end's cost per token
shows. ``--shape qwen3-0.6b`` is the GPU case of issue 9 (bf16 on CUDA).

    python bench/served_vs_engine.py [--shape tiny|qwen3-0.6b] [--streams 32] [--prompt 128] [--gen 128]
        [--clients K] [--in-process] [--adapters N] [--repeats R] [--profile-server FILE] [--serve-args "..."]

A run of 32 x 128/128 lasts ~0.3 s on the H200, so one stall of the host moves its tok/s by several
percent: ``--repeats R`` runs the load R times (distinct prompts, same engine, same server) and
reports every run beside the median.

``--adapters N`` (issue 17) also serves the same streams round-robin over N preloaded rank-16 adapters
(all 7 projections) on a LoRA-enabled server, and reports its tok/s and TTFT p99 against the base
model's served figures of the same run (``lora_over_base``, ``lora_ttft_p99_over_base``).

``--profile-server FILE`` runs the server under cProfile (its main thread: the event loop) and
writes the stats to FILE. Prints one JSON object; writes bench/results/served_vs_engine.json
(served_vs_engine_cpu.json on a CPU; and to $OUT/ when set).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench import engine_throughput  # noqa: E402
from bench.engine_throughput import QWEN3_06B, model_config  # noqa: E402
from bench.serve_stack import Stack, start_serve  # noqa: E402
from bench.serve_throughput import engine_alone  # noqa: E402  (the same LLM.generate measurement)
from loraplex.clients import pb, pb_grpc  # noqa: E402

DEMO = Path(__file__).parents[1] / "backend" / "demo" / "model"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=272)
SHAPES = {"tiny": TINY, "qwen3-0.6b": QWEN3_06B}
TICKS = os.sysconf("SC_CLK_TCK")


def write_model(root: Path, shape: dict, device: str, adapters: int = 0) -> tuple[Path, list[Path]]:
    """Random weights of ``shape`` and ``adapters`` random rank-16 PEFT adapters beside them: the tiny
    shape with the demo model's byte-level tokenizer (its 272 tokens are the vocabulary), a real shape
    with engine_throughput's word-level tokenizer over its whole vocabulary (as bench/serve_throughput.py)."""
    from transformers import AutoModelForCausalLM

    if shape["vocab_size"] != TINY["vocab_size"] or adapters:
        return engine_throughput.write_model(root, shape, device, adapters)
    cfg = model_config("qwen3", shape)
    cfg.eos_token_id = 258
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / name).write_bytes((DEMO / name).read_bytes())
    return root, []


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def core_pid(pid: int) -> int:
    """The engine-core process among the server's children (multiprocessing's resource tracker is one too)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    cores = [int(c) for c in children if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(cores) == 1, children
    return cores[0]


async def stream(stub: pb_grpc.InferenceServiceStub, prompt: list[int], gen: int, adapter: str = "") -> dict:
    """One streaming call: its TTFT, message gaps and token count (every token once, in order)."""
    req = pb.GenerateRequest(adapter=adapter, token_ids=pb.TokenIds(ids=prompt), params=pb.SamplingParameters(
        max_tokens=gen, min_tokens=gen, temperature=0.0, ignore_eos=True))
    t0 = time.monotonic()  # one clock for every client process
    arrivals: list[float] = []
    tokens = 0
    async for chunk in stub.Generate(req):
        if chunk.token_ids:
            arrivals.append(time.monotonic())
            tokens += len(chunk.token_ids)
    assert tokens == gen, (tokens, gen)
    return {"ttft": arrivals[0] - t0, "gaps": np.diff(arrivals).tolist(), "messages": len(arrivals),
            "end": arrivals[-1], "tpot": (arrivals[-1] - arrivals[0]) / max(gen - 1, 1)}


def client_process(target: str, prompts: list[list[int]], gen: int, conn: Connection, adapters: list[str]) -> None:
    """One client process's share of the streams: warm up, say so, wait for the common start, run."""
    gc.collect()
    gc.freeze()  # this module imported torch: a full collection walking it would show as a 0.1-0.5 s "ITL"

    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            await stream(stub, prompts[0], gen)  # warm-up (the base model: adapters' first use is measured)
            conn.send("ready")
            start_at = conn.recv()
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            cpu = time.process_time()
            results = await asyncio.gather(*(stream(stub, p, gen, a) for p, a in zip(prompts, adapters, strict=True)))
            conn.send({"results": results, "cpu": time.process_time() - cpu})

    asyncio.run(run())


def served(target: str, prompts: list[list[int]], gen: int, pids: dict[str, int], clients: int,
           adapters: list[str] | None = None) -> dict:
    """All streams at once from ``clients`` processes (one Python client process cannot read
    ~15k messages/s: it would measure itself); stream i on ``adapters[i]`` ("" = the base model)."""
    ctx = multiprocessing.get_context("spawn")
    names = adapters or [""] * len(prompts)
    pipes, procs = [], []
    for i in range(clients):
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=client_process, args=(target, prompts[i::clients], gen, child,
                                                             names[i::clients])))
        procs[-1].start()
        pipes.append(parent)
    for pipe in pipes:
        assert pipe.recv() == "ready"
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start_at = time.monotonic() + 0.1
    for pipe in pipes:
        pipe.send(start_at)
    shares = [pipe.recv() for pipe in pipes]
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    for proc in procs:
        proc.join(30)
    results = [r for share in shares for r in share["results"]]
    tokens = len(prompts) * gen
    ttft = np.array([r["ttft"] for r in results]) * 1000
    itl = np.concatenate([r["gaps"] for r in results]) * 1000
    per_token = {f"{name}_cpu_us_per_token": round(1e6 * s / tokens, 1) for name, s in cpu.items()}
    return {"tok_s": round(tokens / (max(r["end"] for r in results) - start_at), 1),
            "ttft_ms_p50": round(float(np.percentile(ttft, 50)), 2),
            "ttft_ms_p99": round(float(np.percentile(ttft, 99)), 2),
            "itl_ms_p50": round(float(np.percentile(itl, 50)), 3), "itl_ms_p99": round(float(np.percentile(itl, 99)), 3),
            "tpot_ms_p50": round(1000 * float(np.median([r["tpot"] for r in results])), 3),
            "tokens_per_message": round(tokens / sum(r["messages"] for r in results), 2), **per_token,
            "client_cpu_us_per_token": round(1e6 * sum(share["cpu"] for share in shares) / tokens, 1),
            "client_processes": clients}


def serve_flags(model: Path, num: int, dtype: str, in_process: bool, extra: str, adapters: list[Path]) -> list[str]:
    lora = (["--max-loras", str(len(adapters)), "--max-lora-rank", "16", "--adapter-roots", str(model.parent),
             *(f for i, a in enumerate(adapters) for f in ("--preload", f"a{i}={a}"))] if adapters
            else ["--no-enable-lora"])
    return ["--model", str(model), "--max-num-seqs", str(num), *lora, "--dtype", dtype,
            "--max-model-len", "1024", "--log-level", "warning",
            "--no-engine-process" if in_process else "--engine-process", *shlex.split(extra)]


def run_served(model: Path, sets: list[list[list[int]]], args: argparse.Namespace, dtype: str, in_process: bool,
               log_dir: Path, engine_tok_s: list[float], adapters: list[Path] | None = None) -> dict:
    """Every prompt set's streams, one set after another, on one server; the median run's figures
    with every run under "runs" (run i against engine run i)."""
    wrap = ["-m", "cProfile", "-o", args.profile_server] if args.profile_server and not in_process else []
    n = len(sets[0])
    stack: Stack = start_serve(serve_flags(model, n, dtype, in_process, args.serve_args, adapters or []),
                               log_dir, wrap=wrap)
    names = [f"a{i % len(adapters)}" for i in range(n)] if adapters else None
    try:
        pid = stack.procs[0].pid
        pids = {"server": pid} if in_process else {"front_end": pid, "core": core_pid(pid)}
        runs = [served(stack.target, prompts, args.gen, pids, args.clients, names) for prompts in sets]
    finally:
        stack.stop()
    for run, engine in zip(runs, engine_tok_s, strict=True):
        run["over_engine"] = round(run["tok_s"] / engine, 3)
        run["itl_p99_over_p50"] = round(run["itl_ms_p99"] / run["itl_ms_p50"], 2)
    res = dict(sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2])  # the median run (upper for even counts)
    if len(runs) > 1:
        res["over_engine_median"] = float(np.median([r["over_engine"] for r in runs]))
        res["itl_p99_over_p50_median"] = float(np.median([r["itl_p99_over_p50"] for r in runs]))
        res["runs"] = runs
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--in-process", action="store_true", help="also serve with the core on a server thread")
    ap.add_argument("--adapters", type=int, default=0, help="also serve round-robin over N preloaded adapters")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of the whole load (distinct prompts each), engine and served; figures of the "
                         "median run, every run under 'runs', and the medians of the per-run ratios")
    ap.add_argument("--profile-server", default="", help="cProfile stats of the server process to this file")
    ap.add_argument("--serve-args", default="", help="more `loraplex serve` flags")
    ap.add_argument("--clients", type=int, default=4 if (os.cpu_count() or 1) >= 12 else 1,
                    help="client processes sharing the streams (default: 4 on 12+ cores, else 1)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    sets = []
    for r in range(args.repeats):  # distinct prompts per run: no run hits another's prefix cache
        g = torch.Generator().manual_seed(r)
        sets.append([torch.randint(0, 256, (args.prompt,), generator=g).tolist() for _ in range(args.streams)])
    prompts = sets[0]
    out: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
                 "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "streams": args.streams,
                 "prompt": args.prompt, "gen": args.gen, "serve_args": args.serve_args, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = write_model(Path(tmp) / "model", SHAPES[args.shape], device, args.adapters)
        engine = engine_alone(model, prompts, args.gen, dtype, more=sets[1:])
        assert isinstance(engine, list)
        out["engine_tok_s"] = round(float(np.median(engine)), 1)
        out["engine_runs_tok_s"] = [round(e, 1) for e in engine]
        for name, in_process in (("served", False), ("served_in_process", True)):
            if in_process and not args.in_process:
                continue
            out[name] = run_served(model, sets, args, dtype, in_process, Path(tmp), engine)
        if adapters:
            res = run_served(model, sets, args, dtype, False, Path(tmp), engine, adapters)
            res["lora_over_base"] = round(res["tok_s"] / out["served"]["tok_s"], 3)
            res["lora_ttft_p99_over_base"] = round(res["ttft_ms_p99"] / out["served"]["ttft_ms_p99"], 2)
            res["adapters"] = len(adapters)
            out["served_lora"] = res
    print(json.dumps(out, indent=1))
    for folder in filter(None, (os.environ.get("OUT"), str(Path(__file__).parent / "results"))):
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"served_vs_engine{'' if device == 'cuda' else '_cpu'}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
