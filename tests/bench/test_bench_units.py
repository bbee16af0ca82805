"""The benchmark's pure parts: workload draws, arrivals, vLLM's metric definitions, flag parsing."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from loraplex.clients.bench import BenchError
from loraplex.clients.bench.metrics import crossing_rate, parse_slo, percentile, summarize
from loraplex.clients.bench.records import RequestRecord
from loraplex.clients.bench.workload import (
    LengthSpec,
    arrival_times,
    assign_adapters,
    read_jsonl,
    synthetic_prompts,
)


@pytest.mark.parametrize("p", [0, 1, 50, 90, 99, 99.9, 100])
def test_percentile_is_numpys_linear(p: float) -> None:
    values = [random.Random(3).expovariate(1.0) for _ in range(37)]
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    assert percentile([], p) == 0.0


def test_lengths_fixed_uniform_normal() -> None:
    rng = random.Random(0)
    assert LengthSpec(7, 0.9, "fixed").draw(5, rng) == [7] * 5
    assert LengthSpec(7, 0.0, "uniform").draw(3, rng) == [7] * 3
    uniform = LengthSpec(512, 1.0, "uniform").draw(4000, rng)  # SGLang's U[1, 1024] shape
    assert min(uniform) == 1 and max(uniform) == 1024
    normal = LengthSpec(100, 0.2, "normal").draw(4000, rng)
    assert min(normal) >= 1 and max(normal) <= 200 and abs(np.mean(normal) - 100) < 2 and 15 < np.std(normal) < 25


def test_synthetic_prompts_stay_in_the_vocabulary_and_avoid_eos() -> None:
    prompts = synthetic_prompts(3, [50, 1, 20], vocab_size=5, avoid={4}, rng=random.Random(1))
    assert [len(p) for p in prompts] == [50, 1, 20]
    assert {t for p in prompts for t in p} <= {0, 1, 2, 3}


def test_adapter_distributions() -> None:
    names = ["a", "b", "c", "d"]
    assert assign_adapters(3, [], "zipf", 1.0, random.Random(0)) == ["", "", ""]
    assert assign_adapters(6, names, "round-robin", 1.0, random.Random(0)) == ["a", "b", "c", "d", "a", "b"]
    uniform = Counter(assign_adapters(4000, names, "uniform", 1.0, random.Random(0)))
    assert set(uniform) == set(names) and min(uniform.values()) > 900
    zipf = Counter(assign_adapters(4000, names, "zipf", 1.0, random.Random(0)))
    assert zipf["a"] > zipf["b"] > zipf["c"] > zipf["d"]
    assert zipf["a"] / zipf["b"] == pytest.approx(2.0, rel=0.15)  # weights 1/rank^alpha
    with pytest.raises(BenchError, match="adapter-distribution"):
        assign_adapters(1, names, "pareto", 1.0, random.Random(0))


def test_arrivals() -> None:
    assert arrival_times(4, float("inf"), 1.0, random.Random(0)) == [0.0] * 4
    times = arrival_times(200, 10.0, 1.0, random.Random(0))
    assert times == sorted(times) and times[-1] == pytest.approx(20.0)  # rescaled to n / rate
    gaps = np.diff(times)
    assert 0.7 < np.std(gaps) / np.mean(gaps) < 1.3  # exponential gaps: coefficient of variation 1
    even = arrival_times(50, 10.0, 1000.0, random.Random(0))
    assert np.std(np.diff(even)) < 0.01  # very high burstiness: nearly even spacing


def test_slo_parsing() -> None:
    assert parse_slo("ttft=500,tpot=50") == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slo("e2el:1000") == {"e2el": 1000.0} and parse_slo(None) == {}
    for bad in ("ttft", "speed=3", "ttft=fast", "tpot=-1"):
        with pytest.raises(BenchError, match="--slo"):
            parse_slo(bad)


def record(i: int, ttft: float, latency: float, output_len: int, itl: list[float], ok: bool = True) -> RequestRecord:
    rec = RequestRecord(index=i, adapter="", prompt_len=10, output_len=output_len, ttft=ttft, latency=latency, itl=itl)
    if ok:
        rec.success = True
    else:
        rec.fail("NOT_FOUND", "adapter 'x' is not registered")
    return rec


def test_summary_follows_vllm_definitions() -> None:
    records = [record(0, 0.1, 0.5, 5, [0.1] * 4), record(1, 0.3, 0.3, 1, []), record(2, 0.2, 2.2, 11, [0.2] * 10),
               record(3, 0, 0, 0, [], ok=False)]
    s = summarize(records, duration=2.0, slo={"ttft": 250, "tpot": 150}, percentiles=[50, 99])
    assert (s["num_sent"], s["completed"], s["failed"], s["errors"]) == (4, 3, 1, {"NOT_FOUND": 1})
    assert s["total_output_tokens"] == 17 and s["total_input_tokens"] == 30  # failed requests count nowhere
    assert s["output_throughput"] == pytest.approx(8.5) and s["request_throughput"] == pytest.approx(1.5)
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["median_e2el_ms"] == pytest.approx(500.0)
    # TPOT = (latency - ttft) / (output - 1), only for outputs > 1: 100 ms and 200 ms
    assert s["mean_tpot_ms"] == pytest.approx(150.0)
    assert s["mean_itl_ms"] == pytest.approx((0.1 * 4 + 0.2 * 10) / 14 * 1000)  # pooled gaps
    # good: #0 (ttft 100, tpot 100); not #1 (ttft 300); not #2 (tpot 200)
    assert s["request_goodput"] == pytest.approx(0.5)
    assert summarize(records, 2.0, {}, [50])["request_goodput"] is None


def test_crossing_rate() -> None:
    points = [(1.0, 100.0), (2.0, 400.0), (4.0, 1600.0), (float("inf"), 9000.0)]
    assert crossing_rate(points, 1000.0) == pytest.approx(3.0)
    assert crossing_rate(points, 5000.0) is None and crossing_rate(points, 50.0) is None


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": []}\n')
    with pytest.raises(BenchError, match=r"p.jsonl:2"):
        read_jsonl(path, 10)
    path.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(BenchError, match=r"p.jsonl:2: not JSON"):
        read_jsonl(path, 10)
    assert read_jsonl(path, 1) == [("ok", None)]
