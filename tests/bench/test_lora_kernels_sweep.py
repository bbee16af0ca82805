"""bench/lora_kernels.py on CPU: --help, and the old-vs-new sweep's whole path on tiny shapes with the
Triton kernels in the interpreter (timings meaningless; the table, the JSON and the error check are real)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "lora_kernels.py"


def run(*args: str, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp or ROOT)


def test_help_runs_without_a_gpu() -> None:
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--sweep" in proc.stdout and "--tune" in proc.stdout and "lora_kernels_v1" in proc.stdout


def test_sweep_smoke_writes_json_and_table(tmp_path: Path) -> None:
    proc = run("--sweep", "--cpu-smoke", "--out", str(tmp_path), tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "lora_kernels_sweep.json").read_text())
    rows = report["rows"]
    assert [(r["tokens"], r["distinct"]) for r in rows] == [(1, 1), (40, 1), (40, 2)]
    assert [r["plan"] for r in rows] == ["bgmv/16", "sgmv/64", "sgmv/32"]
    for r in rows:
        assert r["old_graph_us"] > 0 and r["new_graph_us"] > 0 and r["torch_us"] > 0 and r["floor_us"] > 0
        # y deltas of old and new against the torch reference: bf16 rounding of y, nothing more
        assert r["old_rel_err"] < 1.6e-2 and r["new_rel_err"] < 1.6e-2, r
    assert "| model | tokens | adapters | plan (old) |" in proc.stdout
    assert proc.stdout.count("| tiny |") == 2 * len(rows)  # as each finishes, then the final table
