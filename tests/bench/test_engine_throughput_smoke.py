"""bench/engine_throughput.py on CPU: its help, and the adapter residency cases at toy sizes (--tiny)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench" / "engine_throughput.py"


def run(*args: str, timeout: float) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_help_names_the_cases_and_their_flags() -> None:
    out = run("--help", timeout=120)
    for flag in ("--tiny", "--cases", "--many-adapters", "--many-files", "--many-cpu-loras", "--loads"):
        assert flag in out, flag


@pytest.mark.slow
def test_tiny_adapter_residency_cases() -> None:
    res = json.loads(run("--tiny", "--cases", "lora_many,lora_loads", timeout=600).strip().splitlines()[-1])
    many = res["lora_many"]
    assert many["resident"]["adapters"] == 4 and many["resident"]["slot_hit_rate"] == 1.0
    assert many["many"]["adapters"] == 40 and 0 <= many["many"]["slot_hit_rate"] < 1
    assert many["many"]["slot_evictions"] > 0 and many["many_vs_resident"] > 0
    loads = res["lora_loads"]
    assert loads["loads"] == 3 and loads["source_loads"] == 3  # each new adapter read from disk once
    assert loads["load_to_first_token"]["p50_ms"] > 0 and loads["stream_itl"]["loads"]["p99_ms"] > 0
    assert loads["itl_p99_loads_vs_alone"] > 0 and loads["admissions_overdue"] == 0
