"""bench/gemv_sweep.py: the CPU smoke run end to end (Triton interpreter, a child process so the
interpreter flag holds on any machine), its table read back by the kernel's dispatch, and the
size of the GPU grid (one GPU run must tune every shape in about three minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gemv_sweep import GPU_GRID, M_VALUES, SHAPES, candidates, parse_args, split_choices
from loraplex.kernels.gemv import GemvConfig, load_table, parse_table

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_smoke_writes_results_and_a_table_the_kernel_reads(tmp_path: Path) -> None:
    table_path, out = tmp_path / "table.json", tmp_path / "sweep.json"
    table_path.write_text(json.dumps({"_about": "x", "devices": {"GPU A": {"entries": []}}}))
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gemv_sweep.py"), "--cpu-smoke", "--out", str(out),
                           "--write-table", "--table-path", str(table_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(c["proj"], c["m"]) for c in report["cases"]] == [("up", 1), ("up", 4), ("down", 1), ("down", 4)]
    for c in report["cases"]:
        assert c["tried"] >= 3 and not c["failed"] and c["triton_us"] > 0 and c["cublas_us"] > 0
        assert c["speedup"] == c["cublas_us"] / c["triton_us"]
    table = load_table(table_path)
    assert "GPU A" in table["devices"] and table["_about"] == "x"  # other devices' entries are kept
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gemv_sweep.py"), "--cpu-smoke", "--m", "1",
                           "--out", str(out), "--write-table", "--table-path", str(table_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = load_table(table_path)["devices"][report["device"]]["entries"]
    before = table["devices"][report["device"]]["entries"]
    assert len(merged) == 4 and [e for e in merged if e["m"] == 4] == [e for e in before if e["m"] == 4]
    parsed = parse_table(table, report["device"])
    assert set(parsed) == {(1, 40, 64, 2), (4, 40, 64, 2), (1, 24, 96, 2), (4, 24, 96, 2)}
    for (m, _, _, _), (cfg, in_graphs, eager) in parsed.items():
        assert isinstance(cfg, GemvConfig) and cfg.block_m >= m
        assert in_graphs is False and eager is False  # the interpreter never beats torch's CPU linear


def test_help_and_flags() -> None:
    args = parse_args(["--models", "qwen3-0.6b", "--m", "1", "8", "--budget-s", "30"])
    assert args.models == ["qwen3-0.6b"] and args.m == [1, 8] and args.budget_s == 30
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gemv_sweep.py"), "--help"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0 and "--write-table" in proc.stdout


def test_split_choices_keep_whole_tiles() -> None:
    assert split_choices(1024, 3072, 8, 512, GPU_GRID.splits, 132) == [1, 2, 3, 6]  # 128 tiles: one wave at 2
    assert split_choices(151936, 1024, 8, 512, GPU_GRID.splits, 132) == [1, 2]
    assert split_choices(40, 50, 8, 32, GPU_GRID.splits, 132) == [1]  # no whole-tile split: the ragged ones


def test_gpu_grid_is_small_enough_for_one_run() -> None:
    """Every real shape gets valid configs covering its M, and the whole sweep compiles few variants."""
    variants, trials = set(), 0
    for projs in SHAPES.values():
        for n, k in projs.values():
            for m in M_VALUES:
                cfgs = candidates(m, n, k, GPU_GRID, 132)
                trials += len(cfgs)
                assert all(c.block_m >= m for c in cfgs)
                assert all(k % (c.split_k * c.block_k) == 0 for c in cfgs[1:])
                variants |= {(c.block_m, c.block_n, c.block_k, c.mode, c.split_k > 1, c.num_warps, c.num_stages)
                             for c in cfgs}
    assert trials < 4000 and len(variants) < 200, (trials, len(variants))  # a few ms per trial, ~0.5 s per variant
