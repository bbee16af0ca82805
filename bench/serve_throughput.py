"""The served path against the engine alone, same GPU, same model, same workload, one run.

Engine alone: ``LLM.generate`` over N requests (P tokens in, G out, greedy, EOS ignored).
Served: a real ``loraplex serve`` process on loopback and N concurrent streaming gRPC
``Generate`` calls through the generated stubs. Reports tok/s of both, their ratio, and the
inter-token latency (ITL) and time-to-first-token percentiles seen by the clients.
Prints one JSON line; writes bench/results/serve_throughput.json (and $OUT/ when set).
Usage: python bench/serve_throughput.py [--tiny] [--num 32] [--prompt 128] [--gen 128] [--extra-args "..."]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_throughput import QWEN3_06B, TINY, write_model  # noqa: E402

from loraplex.clients import pb, pb_grpc  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_alone(model: Path, prompts: list[list[int]], gen: int, dtype: str,
                 more: list[list[list[int]]] | None = None) -> float | list[float]:
    """tok/s of ``LLM.generate(prompts)`` after a warm-up; with ``more`` (further prompt sets, distinct so
    that no run hits another's prefix cache), the list of every set's tok/s on the same engine."""
    from loraplex import LLM, SamplingParams

    llm = LLM(str(model), dtype=dtype, max_num_seqs=len(prompts), enable_lora=False, max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=gen, min_tokens=gen, ignore_eos=True)
    llm.generate(prompts[:4], params)
    rates = []
    for batch in [prompts, *(more or [])]:
        t = time.perf_counter()
        llm.generate(batch, params)
        rates.append(len(batch) * gen / (time.perf_counter() - t))
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rates if more is not None else rates[0]


async def stream(stub, prompt: list[int], gen: int) -> tuple[float, list[float]]:
    """(TTFT, arrival times of every token) of one streaming call."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), params=pb.SamplingParameters(
        max_tokens=gen, min_tokens=gen, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    times: list[float] = []
    async for chunk in stub.Generate(req):
        times += [time.perf_counter()] * len(chunk.token_ids)
    assert len(times) == gen, len(times)
    return times[0] - t0, times


async def served(port: int, prompts: list[list[int]], gen: int) -> dict:
    gc.collect()
    gc.freeze()  # this process imported torch: a full collection walking it would show as a long "ITL"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await asyncio.gather(*(stream(stub, p, gen) for p in prompts[:4]))  # warm-up
        t = time.perf_counter()
        results = await asyncio.gather(*(stream(stub, p, gen) for p in prompts))
        dt = time.perf_counter() - t
    ttft = np.array([r[0] for r in results]) * 1000
    itl = np.concatenate([np.diff(r[1]) for r in results]) * 1000
    return {"tok_s": round(len(prompts) * gen / dt, 1), "ttft_ms_p50": round(float(np.percentile(ttft, 50)), 2),
            "ttft_ms_p99": round(float(np.percentile(ttft, 99)), 2), "itl_ms_p50": round(float(np.percentile(itl, 50)), 3),
            "itl_ms_p99": round(float(np.percentile(itl, 99)), 3), "itl_ms_mean": round(float(itl.mean()), 3)}


def start_server(model: Path, port: int, num: int, dtype: str, extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loraplex.backend.cli", "serve", "--model", str(model), "--port", str(port),
           "--metrics-port", str(free_port()), "--max-num-seqs", str(num), "--no-enable-lora", "--dtype", dtype,
           "--max-model-len", "1024", *shlex.split(extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                pb_grpc.InferenceServiceStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=2)
                return proc
        except grpc.RpcError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--extra-args", default="", help="more `loraplex serve` flags")
    args = ap.parse_args()
    if args.tiny:
        args.num, args.prompt, args.gen = 4, 8, 8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 500, (args.prompt,), generator=g).tolist() for _ in range(args.num)]
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = write_model(Path(tmp), TINY if args.tiny else QWEN3_06B, device, 0)
        engine_tok_s = engine_alone(model, prompts, args.gen, dtype)
        port = free_port()
        proc = start_server(model, port, args.num, dtype, args.extra_args)
        try:
            res = asyncio.run(served(port, prompts, args.gen))
        finally:
            proc.terminate()
            proc.wait(60)
    out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
           "requests": args.num, "prompt": args.prompt, "gen": args.gen, "engine_tok_s": round(engine_tok_s, 1),
           "served": res, "served_over_engine": round(res["tok_s"] / engine_tok_s, 3),
           "itl_p99_over_p50": round(res["itl_ms_p99"] / res["itl_ms_p50"], 2), "serve_args": args.extra_args}
    print(json.dumps(out))
    for folder in filter(None, (os.environ.get("OUT"), str(Path(__file__).parent / "results"))):
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, "serve_throughput.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
