"""bench/serve_suite.sh --smoke: the GPU serving suite's whole path on tiny random models on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_suite_smoke_writes_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "serve_suite.sh"), "--smoke"], capture_output=True,
                          text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "serve_suite.json").read_text())
    assert report["smoke"] and report["device"] == "cpu"
    sglang, qwen = report["sglang"], report["qwen"]
    for case in (sglang["lora"], sglang["base"], qwen["gateway"]["grpc"], qwen["gateway"]["gateway"]):
        assert case["failed"] == 0 and case["completed"] == case["num_sent"] > 0 and case["output_throughput"] > 0
    for name in ("base", "lora"):
        sweep = qwen[name]
        assert sweep["rates"] == [2.0, 4.0] and len(sweep["p99_ttft_ms"]) == 2
        assert sweep["half_rate"]["completed"] > 0 and sweep["half_rate"]["p50_itl_ms"] > 0
        for png in sweep["plots"]:
            assert Path(png).stat().st_size > 5000
    assert qwen["gateway"]["gateway_vs_grpc_output_tok_s"] > 0
    assert "gRPC vs the gateway" in (tmp_path / "serve_suite.md").read_text()
    assert (tmp_path / "serve" / "sglang-lora4-latency_cdf.png").stat().st_size > 5000
    # a run cut short keeps its printed summaries: the log parser finds every run with its figures
    sys.path.insert(0, str(ROOT))
    from bench.serve_report import summaries_from_log, sweep_plot

    printed = summaries_from_log(proc.stdout)
    runs = sorted(f.name for f in (tmp_path / "serve").glob("*.json"))
    assert sorted(printed) == runs and len(runs) >= 10
    for name in runs:
        summary = json.loads((tmp_path / "serve" / name).read_text())["runs"][0]["summary"]
        assert int(printed[name]["Successful requests"]) == summary["completed"]
        assert float(printed[name]["P99 TTFT (ms)"]) == pytest.approx(summary["p99_ttft_ms"], abs=0.01)
    assert sweep_plot(printed, tmp_path / "sweep.png").stat().st_size > 5000
