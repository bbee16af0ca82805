"""Served path vs the engine alone: 32 concurrent streams through a real ``loraplex serve``, with the
engine core in its own process (default) and on a thread of the server process, beside the same
workload on the engine's own async client (no gRPC). Prints tokens/s and inter-token latency.

    python bench/served_vs_engine.py [--device cpu] [--streams 32] [--max-tokens 128] [--model M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

from loraplex.clients import AsyncClient, pb

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def engine_alone(args: argparse.Namespace) -> float:
    """The engine's own async client, no gRPC: the step loop on its thread, as the server runs it."""
    from loraplex import SamplingParams
    from loraplex.backend.engine.async_engine import AsyncEngine
    from loraplex.backend.engine.request import EngineRequest
    from loraplex.config import EngineConfig

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    async def run() -> float:
        engine = AsyncEngine(EngineConfig.from_kwargs(model=args.model, device=args.device,
                                                      max_num_seqs=args.streams))
        await engine.start()

        async def one(rid: str) -> int:
            return sum([len(o.new_token_ids) async for o in engine.generate(EngineRequest(rid, PROMPT, params=params))])

        await asyncio.gather(*[one(f"warm-{i}") for i in range(2)])
        start = time.monotonic()
        counts = await asyncio.gather(*[one(f"r{i}") for i in range(args.streams)])
        elapsed = time.monotonic() - start
        await engine.shutdown()
        return sum(counts) / elapsed

    return asyncio.run(run())


def start_serve(args: argparse.Namespace, in_process: bool) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "loraplex.backend.cli", "serve", "--device", args.device, "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--max-num-seqs", str(args.streams),
           "--log-level", "WARNING", "--no-engine-process" if in_process else "--engine-process"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # metrics line
    return proc, proc.stdout.readline().strip().rsplit(" ", 1)[1]


async def served(target: str, args: argparse.Namespace) -> tuple[float, float, float]:
    params = pb.SamplingParameters(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    gaps: list[float] = []

    async def one(client: AsyncClient) -> int:
        tokens, last = 0, time.monotonic()
        async for chunk in client.generate_stream(pb.GenerateRequest(prompt=PROMPT, params=params), timeout=600):
            now = time.monotonic()
            if tokens:
                gaps.append(now - last)
            tokens, last = tokens + len(chunk.token_ids), now
        return tokens

    async with AsyncClient(target) as client:
        await asyncio.gather(*[one(client) for _ in range(2)])  # warm-up
        gaps.clear()
        start = time.monotonic()
        counts = await asyncio.gather(*[one(client) for _ in range(args.streams)])
        elapsed = time.monotonic() - start
    gaps.sort()
    return sum(counts) / elapsed, statistics.median(gaps) * 1000, gaps[int(0.99 * (len(gaps) - 1))] * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    engine_tok_s = engine_alone(args)
    results: dict[str, object] = {"engine_alone_tok_s": round(engine_tok_s, 1)}
    for name, in_process in (("served_core_process", False), ("served_in_process", True)):
        proc, target = start_serve(args, in_process)
        try:
            tok_s, itl_p50, itl_p99 = asyncio.run(served(target, args))
        finally:
            proc.terminate()
            proc.wait(60)
        results[f"{name}_tok_s"] = round(tok_s, 1)
        results[f"{name}_itl_ms_p50_p99"] = [round(itl_p50, 1), round(itl_p99, 1)]
        results[f"{name}_pct_of_engine"] = round(100 * tok_s / engine_tok_s, 1)
    print(json.dumps({"device": args.device, "streams": args.streams, "max_tokens": args.max_tokens, **results},
                     indent=1))


if __name__ == "__main__":
    main()
