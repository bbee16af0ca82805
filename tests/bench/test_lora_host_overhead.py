"""bench/lora_host_overhead.py on CPU at toy sizes: its table and JSON, and what LoRA adds per step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "bench" / "lora_host_overhead.py"


def test_toy_run_reports_every_case_by_file(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--batches", "4", "--gen", "6", "--repeats", "1",
                           "--cases", "off,idle,1,3", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 4 (ms/step)" in done.stdout and "outside the forward" in done.stdout
    res = {r["case"]: r for r in json.loads((tmp_path / "lora_host_overhead.json").read_text())["results"]}
    assert set(res) == {"off", "idle", "1", "3"}
    for r in res.values():
        assert r["steps"] >= 6 and r["host_ms_per_step"] > 0 and r["calls_per_step"] > 0
        assert "backend/engine/scheduler.py" in r["by_file"] and not any("torch/" in f for f in r["by_file"])
    # LoRA code runs only when a request uses an adapter; the registry is not asked per adapter per step
    assert "kernels/lora.py" not in res["idle"]["by_file"] and res["1"]["by_file"]["kernels/lora.py"] > 0
    assert "lora/registry.py" not in res["off"]["calls_by_file"]
    def registry_calls(case: str) -> float:  # per step
        calls = res[case]["calls_by_file"]
        return calls.get("lora/registry.py", 0.0) + calls.get("lora/slot_table.py", 0.0)

    # 3 adapters vs 1, same requests: about 12 more calls a step when each step walked its adapters
    assert registry_calls("3") - registry_calls("1") < 4, (registry_calls("3"), registry_calls("1"))
