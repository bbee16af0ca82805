"""``loraplex bench serve`` against a real ``loraplex serve`` (demo model, CPU) and a real gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.serve_stack import Stack, loraplex_command
from loraplex.backend.demo import DEMO_ADAPTERS
from loraplex.clients import Client
from tests.bench.helpers import run_bench

# Short everything: 6 prompts of about 8 tokens, exactly 4 output tokens each.
SHORT = ["--num-prompts", "6", "--random-input-len", "8", "--random-output-len", "4", "--ignore-eos", "--seed", "1"]
SUMMARY_FIELDS = {
    "duration", "num_sent", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput", "errors",
    "error_examples",
    *(f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "std", "p50", "p90",
                                                                         "p99")),
}
RECORD_FIELDS = {"index", "adapter", "prompt_len", "output_len", "start", "ttft", "latency", "itl", "success",
                 "error_code", "error"}
DEMO_NAMES = sorted(DEMO_ADAPTERS)


def check_run(run: dict, sent: int | None = None) -> dict:
    """Every field is there and the counts add up; the summary."""
    s = run["summary"]
    assert set(s) >= SUMMARY_FIELDS, SUMMARY_FIELDS - set(s)
    assert s["num_sent"] == s["completed"] + s["failed"] == len(run["requests"])
    assert sum(s["errors"].values()) == s["failed"]
    for rec in run["requests"]:
        assert set(rec) == RECORD_FIELDS
    if sent is not None:
        assert s["num_sent"] == sent
    return s


@pytest.mark.parametrize("arrivals, mix", [
    (["--request-rate", "inf"], []),
    (["--request-rate", "40"], ["--adapters", "1"]),
    (["--max-concurrency", "2"], ["--adapters", "3", "--adapter-distribution", "round-robin"]),
    (["--request-rate", "40", "--burstiness", "0.5"], ["--adapters", "4", "--adapter-distribution", "uniform"]),
    (["--request-rate", "inf"], ["--adapters", "4", "--adapter-distribution", "zipf", "--zipf-alpha", "1.5"]),
], ids=["all-at-once-base", "poisson-one-adapter", "concurrency-round-robin", "bursty-uniform", "zipf"])
def test_grpc_arrival_modes_and_adapter_mixes(stack: Stack, arrivals: list[str], mix: list[str]) -> None:
    result = run_bench("--endpoint", f"grpc://{stack.target}", *SHORT, *arrivals, *mix)
    run = result["runs"][0]
    s = check_run(run, sent=6)
    assert s["failed"] == 0, s["error_examples"]
    assert s["total_output_tokens"] == 6 * 4  # --ignore-eos: exactly the drawn length
    assert s["mean_ttft_ms"] > 0 and s["p99_itl_ms"] > 0 and s["output_throughput"] > 0
    assert result["server"]["vocab_size"] > 0  # learned from the server, not downloaded
    used = [r["adapter"] for r in run["requests"]]
    if not mix:
        assert set(used) == {""}
    elif "round-robin" in mix:
        assert used == [DEMO_NAMES[i % 3] for i in range(6)]
    else:
        assert set(used) <= set(DEMO_NAMES[: int(mix[1])]) and "" not in used


def test_concurrency_and_time_bound_stop_sending(stack: Stack) -> None:
    result = run_bench("--endpoint", f"grpc://{stack.target}", "--num-prompts", "40", "--random-input-len", "8",
                       "--random-output-len", "8", "--ignore-eos", "--max-concurrency", "1", "--duration", "0.3")
    s = check_run(result["runs"][0])
    assert 1 <= s["num_sent"] < 40 and s["failed"] == 0


def test_sweep_writes_json_and_pngs(stack: Stack, tmp_path: Path) -> None:
    result = run_bench("--endpoint", f"grpc://{stack.target}", *SHORT, "--request-rate", "20,60",
                       "--adapters", "2", "--adapter-distribution", "zipf", "--slo", "ttft=60000,tpot=60000",
                       "--save-result", "--result-dir", str(tmp_path), "--result-filename", "sweep.json", "--plot")
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["request_rate"] for r in saved["runs"]] == [20.0, 60.0]
    for run in saved["runs"]:
        s = check_run(run, sent=6)
        assert s["request_goodput"] == pytest.approx(s["completed"] / s["duration"])  # generous SLOs: all good
    assert saved["sweep"]["rates"] == [20.0, 60.0] and saved["sweep"]["p99_ttft_crossing_rate"] is None
    assert len(saved["sweep"]["p99_itl_ms"]) == 2
    pngs = [tmp_path / f"sweep-{name}.png" for name in ("latency_cdf", "ttft_vs_rate", "itl_vs_rate")]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
    assert saved["plots"] == result["plots"] == [str(p) for p in pngs]


@pytest.mark.parametrize("through", ["grpc", "http"])
def test_unknown_adapter_shows_up_as_errors(stack: Stack, through: str) -> None:
    endpoint = f"grpc://{stack.target}" if through == "grpc" else stack.url
    result = run_bench("--endpoint", endpoint, *SHORT, "--adapter-names", "upper,nosuch",
                       "--adapter-distribution", "round-robin")
    s = check_run(result["runs"][0], sent=6)
    code = "NOT_FOUND" if through == "grpc" else "HTTP_404"
    assert (s["completed"], s["failed"], s["errors"]) == (3, 3, {code: 3})
    assert "nosuch" in s["error_examples"][code]


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_gateway_streams_completions_and_chat(stack: Stack, api: str) -> None:
    result = run_bench("--endpoint", stack.url, "--api", api, *SHORT, "--adapters", "2", "--request-rate", "50")
    s = check_run(result["runs"][0], sent=6)
    assert s["failed"] == 0, s["error_examples"]
    assert s["total_output_tokens"] == 24 and s["total_input_tokens"] > 0  # the gateway's usage counts
    assert s["mean_ttft_ms"] > 0 and s["mean_itl_ms"] > 0


def test_register_loads_copies_under_new_names(stack: Stack) -> None:
    result = run_bench("--endpoint", f"grpc://{stack.target}", *SHORT, "--register", "2", "--source",
                       str(DEMO_ADAPTERS["upper"]), "--register-prefix", "copy-", "--adapter-distribution",
                       "round-robin")
    s = check_run(result["runs"][0], sent=6)
    assert s["failed"] == 0 and result["runs"][0]["adapters"] == ["copy-0", "copy-1"]
    with Client(stack.target) as client:
        assert {"copy-0", "copy-1"} <= {a.name for a in client.list_adapters()}


def test_jsonl_prompts(stack: Stack, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hello world", "max_tokens": 3}\n\n{"prompt": [5, 6, 7]}\n{"prompt": "abc"}\n')
    result = run_bench("--endpoint", f"grpc://{stack.target}", "--dataset-name", "jsonl", "--dataset-path",
                       str(data), "--num-prompts", "10", "--random-output-len", "2", "--ignore-eos")
    run = result["runs"][0]
    check_run(run, sent=3)
    assert [r["output_len"] for r in run["requests"]] == [3, 2, 2]
    assert run["requests"][1]["prompt_len"] == 3


def test_console_command(stack: Stack, tmp_path: Path) -> None:
    """As a user types it: `loraplex bench serve ...` through the main CLI."""
    ok = subprocess.run([*loraplex_command(), "bench", "serve", "--endpoint", f"grpc://{stack.target}", *SHORT,
                         "--save-result", "--result-dir", str(tmp_path), "--result-filename", "cli.json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "Serving Benchmark Result" in ok.stdout and "Successful requests:" in ok.stdout
    assert json.loads((tmp_path / "cli.json").read_text())["runs"][0]["summary"]["completed"] == 6
    bad = subprocess.run([*loraplex_command(), "bench", "serve", "--endpoint", f"grpc://{stack.target}",
                          "--register", "2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--source" in bad.stderr


def test_bench_imports_no_torch() -> None:
    forbidden = ("torch", "transformers", "loraplex.backend", "loraplex.lora", "loraplex.kernels", "matplotlib")
    code = ("import sys, loraplex.clients.bench, loraplex.clients.bench.http_endpoint; "
            f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {forbidden!r})]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
