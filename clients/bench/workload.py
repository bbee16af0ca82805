"""What the benchmark sends and when: prompts, output lengths, adapters per request, arrival times.

Pure Python (``random``), so a client-only install needs nothing more. One seeded
``random.Random`` drives everything, so a seed reproduces a workload exactly.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loraplex.clients.bench.errors import BenchError


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: a prompt (text, or token ids), its output budget and its adapter."""

    index: int
    prompt: str | list[int]
    prompt_len: int  # tokens when the prompt is token ids; 0 = unknown until the server counts it
    max_tokens: int | None  # None = the server's default (free output length)
    adapter: str = ""  # "" = the base model


@dataclass(frozen=True)
class LengthSpec:
    """Lengths around ``mean``: fixed, uniform in [mean(1-r), mean(1+r)], or normal (std r*mean), each >= 1."""

    mean: int
    range_ratio: float = 0.0
    distribution: str = "uniform"  # fixed | uniform | normal

    def draw(self, n: int, rng: random.Random) -> list[int]:
        if self.distribution == "fixed" or self.range_ratio == 0:
            return [max(1, self.mean)] * n
        if self.distribution == "uniform":
            low = max(1, math.floor(self.mean * (1 - self.range_ratio)))
            high = max(low, math.ceil(self.mean * (1 + self.range_ratio)))
            return [rng.randint(low, high) for _ in range(n)]
        if self.distribution == "normal":
            std = self.range_ratio * self.mean
            return [max(1, min(round(rng.gauss(self.mean, std)), 2 * self.mean)) for _ in range(n)]
        raise BenchError(f"--random-length-distribution: unknown {self.distribution!r} (fixed, uniform, normal)")


def synthetic_prompts(n: int, input_lens: list[int], vocab_size: int, avoid: set[int],
                      rng: random.Random) -> list[list[int]]:
    """``n`` prompts of random token ids in [0, vocab_size), never one of ``avoid`` (e.g. EOS)."""
    usable = vocab_size - len([t for t in avoid if 0 <= t < vocab_size])
    if usable <= 0:
        raise BenchError(f"no usable token ids in a vocabulary of {vocab_size}")

    def token() -> int:
        while True:
            t = rng.randrange(vocab_size)
            if t not in avoid:
                return t

    return [[token() for _ in range(length)] for length in input_lens[:n]]


def synthetic_text(length: int, rng: random.Random) -> str:
    """About ``length`` tokens of text (single letters and spaces) for APIs that take only text."""
    return " ".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def read_jsonl(path: Path, n: int) -> list[tuple[str | list[int], int | None]]:
    """The first ``n`` (prompt, max_tokens or None) of a JSONL file: ``{"prompt": TEXT | [IDS], "max_tokens": N?}``."""
    rows: list[tuple[str | list[int], int | None]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BenchError(f"--dataset-path {path}: {exc.strerror or exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt
                                                             and all(isinstance(t, int) for t in prompt)):
            raise BenchError(f"{path}:{number}: needs \"prompt\": a non-empty string or list of token ids")
        max_tokens = row.get("max_tokens", row.get("output_len"))
        rows.append((prompt, int(max_tokens) if max_tokens is not None else None))
        if len(rows) == n:
            break
    if not rows:
        raise BenchError(f"--dataset-path {path}: no prompts")
    return rows


def assign_adapters(n: int, names: Sequence[str], distribution: str, zipf_alpha: float,
                    rng: random.Random) -> list[str]:
    """The adapter of each of ``n`` requests: "" (base) when ``names`` is empty; else round-robin,
    uniform, or Zipf(alpha) over ``names`` (the first name is the most popular)."""
    if not names:
        return [""] * n
    if distribution == "round-robin":
        return [names[i % len(names)] for i in range(n)]
    if distribution == "uniform":
        return [rng.choice(names) for _ in range(n)]
    if distribution == "zipf":
        weights = [1.0 / (rank + 1) ** zipf_alpha for rank in range(len(names))]
        return rng.choices(list(names), weights=weights, k=n)
    raise BenchError(f"--adapter-distribution: unknown {distribution!r} (uniform, zipf, round-robin)")


def arrival_times(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times in seconds from the start: all 0 for rate inf; else gamma gaps (Poisson when
    burstiness is 1) rescaled so the last arrival is at n/rate, as ``vllm bench serve`` does."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise BenchError(f"--request-rate and --burstiness must be > 0 (got {rate}, {burstiness})")
    times, t = [], 0.0
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        times.append(t)
    scale = (n / rate) / times[-1] if times and times[-1] > 0 else 1.0
    return [x * scale for x in times]
