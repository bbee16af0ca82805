"""``loraplex bench serve``: flags (``vllm bench serve``'s names where it has one) and the run.

    loraplex bench serve --endpoint grpc://localhost:50051 --num-prompts 200 --request-rate 4 \\
        --random-input-len 512 --random-output-len 128 --ignore-eos --adapters 8 --adapter-distribution zipf
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from loraplex.clients.bench.errors import BenchError
from loraplex.clients.bench.grpc_endpoint import GrpcEndpoint, SamplingChoice, ServerFacts
from loraplex.clients.bench.metrics import parse_slo
from loraplex.clients.bench.suite import run_suite

API_KEY_ENV = "LORAPLEX_API_KEY"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("connection")
    c.add_argument("--endpoint", default="grpc://localhost:50051",
                   help="grpc://HOST:PORT (the gRPC server) or http://HOST:PORT/v1 (the OpenAI gateway)")
    c.add_argument("--api", choices=["completions", "chat"], default="completions",
                   help="over HTTP: /v1/completions (token-id prompts) or /v1/chat/completions (text)")
    c.add_argument("--api-key", help=f"bearer token (else --api-key-file, else ${API_KEY_ENV})")
    c.add_argument("--api-key-file", metavar="PATH", help="read the bearer token from this file")
    c.add_argument("--tls-ca", metavar="PEM", help="CA certificate to verify the server with (turns TLS on)")
    c.add_argument("--tls-cert", metavar="PEM", help="client certificate chain for mutual TLS")
    c.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS")
    c.add_argument("--request-timeout", type=float, default=None, help="per-request deadline in seconds")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset-name", choices=["random", "jsonl"], default="random",
                   help="random token ids from the served vocabulary, or a JSONL file (--dataset-path)")
    w.add_argument("--dataset-path", type=Path, help='JSONL, one {"prompt": TEXT or [IDS], "max_tokens": N?} a line')
    w.add_argument("--num-prompts", type=int, default=1000, help="requests to send (default 1000)")
    w.add_argument("--random-input-len", type=int, default=1024, help="mean prompt length in tokens")
    w.add_argument("--random-output-len", type=int, default=128, help="mean output length in tokens")
    w.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="uniform: lengths in [L(1-r), L(1+r)]; normal: std r*L (default 0: fixed)")
    w.add_argument("--random-length-distribution", choices=["fixed", "uniform", "normal"], default="uniform")
    w.add_argument("--vocab-size", type=int, help="token ids are drawn below this (default: ask the server)")
    w.add_argument("--ignore-eos", action="store_true",
                   help="fixed output lengths: ignore EOS and generate exactly the drawn length")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0, greedy)")
    w.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths, adapters and arrivals")
    a = p.add_argument_group("arrivals")
    a.add_argument("--request-rate", default="inf",
                   help="requests/s of a Poisson process; inf = all at once; a comma list runs a sweep")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    a.add_argument("--max-concurrency", type=int, help="most requests in flight (with rate inf: a closed loop)")
    a.add_argument("--duration", type=float, help="stop sending after this many seconds (per rate)")
    a.add_argument("--num-warmups", type=int, default=0, help="requests sent (and not measured) first")
    d = p.add_argument_group("adapters")
    d.add_argument("--adapters", type=int, default=None,
                   help="spread requests over N adapters (the server's first N by name, or the registered ones); "
                        "default 0: the base model")
    d.add_argument("--adapter-names", help="comma-separated adapter names to use instead")
    d.add_argument("--adapter-distribution", choices=["uniform", "zipf", "round-robin"], default="uniform")
    d.add_argument("--zipf-alpha", type=float, default=1.0, help="Zipf exponent (the first adapter is the hottest)")
    d.add_argument("--register", type=int, default=0, metavar="N",
                   help="first load N copies of --source as <--register-prefix>0..N-1")
    d.add_argument("--source", help="adapter directory (or hub id) the server loads for --register")
    d.add_argument("--register-prefix", default="bench-lora-", help="name prefix of registered copies")
    r = p.add_argument_group("results")
    r.add_argument("--slo", help="goodput SLOs in ms, e.g. ttft=500,tpot=50 (keys ttft, tpot, e2el)")
    r.add_argument("--metric-percentiles", default="50,90,99", help="percentiles to report (default 50,90,99)")
    r.add_argument("--save-result", action="store_true", help="write the JSON result to --result-dir")
    r.add_argument("--result-dir", type=Path, default=Path("."), help="where JSON and PNGs go (default .)")
    r.add_argument("--result-filename", help="JSON file name (default: <label>-<date>.json)")
    r.add_argument("--label", default="", help="a name for this run in files and JSON")
    r.add_argument("--plot", action="store_true", help="draw PNGs (needs matplotlib: loraplex[bench])")
    r.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex bench", description="Benchmarks of a running loraplex server.")
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="serving benchmark: TTFT, TPOT, ITL, throughput, goodput, adapter mixes",
                           description="Drive a running server over gRPC or the OpenAI gateway and report "
                                       "latency percentiles and throughput (vllm bench serve's definitions).")
    add_serve_arguments(serve)
    return parser


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--request-rate: {text!r} is not a number, inf, or a comma list of them") from None
    if not rates or any(r <= 0 or math.isnan(r) for r in rates):
        raise BenchError(f"--request-rate: {text!r}: rates must be > 0")
    return rates


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--metric-percentiles: {text!r} is not a comma list of numbers") from None
    if not values or any(not 0 < v < 100 for v in values):
        raise BenchError(f"--metric-percentiles: {text!r}: each must be in (0, 100)")
    return values


def resolve_token(args: argparse.Namespace) -> str | None:
    if args.api_key:
        return str(args.api_key)
    if args.api_key_file:
        try:
            return Path(args.api_key_file).read_text().strip().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise BenchError(f"--api-key-file {args.api_key_file}: cannot read a token ({exc})") from None
    return os.environ.get(API_KEY_ENV) or None


def make_endpoint(args: argparse.Namespace) -> Any:
    url, timeout = args.endpoint, args.request_timeout
    if url.startswith(("http://", "https://")):
        from loraplex.clients.bench.http_endpoint import HttpEndpoint

        return HttpEndpoint(url, args.api, resolve_token(args), args.tls_ca, args.tls_cert, args.tls_key, timeout)
    if args.api == "chat":
        raise BenchError("--api chat is for http:// endpoints; over gRPC prompts are token ids or text")

    def read(path: str | None) -> bytes | None:
        try:
            return Path(path).read_bytes() if path else None
        except OSError as exc:
            raise BenchError(f"{path}: {exc.strerror or exc}") from None

    target = url.removeprefix("grpc://").removeprefix("grpcs://")
    return GrpcEndpoint(target, resolve_token(args), read(args.tls_ca), read(args.tls_key), read(args.tls_cert),
                        timeout)


def check_args(args: argparse.Namespace) -> None:
    if args.num_prompts < 1:
        raise BenchError("--num-prompts must be >= 1")
    if args.dataset_name == "jsonl" and not args.dataset_path:
        raise BenchError("--dataset-name jsonl needs --dataset-path")
    if args.register and not args.source:
        raise BenchError("--register N needs --source DIR (the adapter to copy)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError("--max-concurrency must be >= 1")
    if min(args.random_input_len, args.random_output_len) < 1 or args.random_range_ratio < 0:
        raise BenchError("--random-input-len/--random-output-len must be >= 1, --random-range-ratio >= 0")


async def bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark the flags describe; the whole result (also printed, saved and plotted as asked)."""
    check_args(args)
    rates, percentiles, slo = parse_rates(args.request_rate), parse_percentiles(args.metric_percentiles), \
        parse_slo(args.slo)
    endpoint = make_endpoint(args)
    try:
        facts: ServerFacts = await endpoint.describe(args.vocab_size)
        names = await choose_adapters(endpoint, args)
        sampling = SamplingChoice(temperature=args.temperature, ignore_eos=args.ignore_eos)
        return await run_suite(endpoint, facts, names, sampling, rates, percentiles, slo, args,
                               random.Random(args.seed))
    finally:
        await endpoint.close()


async def choose_adapters(endpoint: Any, args: argparse.Namespace) -> list[str]:
    if args.adapter_names:
        return [n.strip() for n in args.adapter_names.split(",") if n.strip()]
    if args.register:
        names = [f"{args.register_prefix}{i}" for i in range(args.register)]
        for name in names:
            await endpoint.register(name, args.source)
        return names[: args.adapters] if args.adapters else names
    wanted = args.adapters or 0
    if not wanted:
        return []
    available = await endpoint.adapters()
    if len(available) < wanted:
        raise BenchError(f"--adapters {wanted}: the server has only {len(available)} ({', '.join(available)}); "
                         "use --register N --source DIR")
    return available[:wanted]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    started = time.time()
    try:
        asyncio.run(bench_serve(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"done in {time.time() - started:.1f}s", file=sys.stderr)
    return 0
