"""Helpers of the bench tests: the demo server's flags, and the benchmark run in-process."""

from __future__ import annotations

import asyncio
from typing import Any

from loraplex.clients.bench import bench_serve, build_parser

DEMO_FLAGS = ["--device", "cpu", "--max-model-len", "256", "--kv-cache-memory-bytes", str(32 * 2**20)]


def run_bench(*flags: str) -> dict[str, Any]:
    """``loraplex bench serve FLAGS`` in this process; the result dict."""
    args = build_parser().parse_args(["serve", "--disable-tqdm", *flags])
    return asyncio.run(bench_serve(args))
