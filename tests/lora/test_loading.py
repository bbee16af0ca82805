"""Adapter loads off the engine thread, admission and eviction, on CPU with real PEFT adapters.

The slow source below is the real PEFT reader behind a sleep (or a gate the test opens), and the
slow writer the real slot write done in two halves with a sleep between: they only change when
things happen, so every output is checked against HF + PEFT or against the same run without them.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peft import PeftModel
from prometheus_client import generate_latest

from loraplex import LLM, SamplingParams
from loraplex.backend.engine.async_engine import AsyncEngine
from loraplex.backend.engine.llm_engine import LLMEngine
from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.metrics import Metrics
from loraplex.backend.outputs import RequestOutput
from loraplex.config import EngineConfig
from loraplex.errors import AdapterLoadError
from loraplex.lora.peft import LoRAWeights, load_peft_adapter
from loraplex.lora.types import SlotStatus
from tests.engine_factory import assert_no_leaks, hf_greedy, load_hf, write_tiny_model
from tests.lora_factory import TMP_ROOTS, clone_peft_adapter, make_peft_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
NAMES = ["a", "b", "c", "d"]
PROMPTS = [[5, 9, 17, 33, 2], [40, 41, 42], [7] * 11, [100, 3, 8, 21], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("loading")
    base_dir = write_tiny_model(root / "base", "llama")
    hf = load_hf(base_dir)
    dirs = {name: make_peft_adapter(hf, root / "adapters" / name, r=4, alpha=8, targets=TARGETS, seed=i + 1)
            for i, name in enumerate(NAMES)}
    refs = {None: hf, **{n: PeftModel.from_pretrained(copy.deepcopy(hf), d).eval() for n, d in dirs.items()}}
    return {"root": root, "base": base_dir, "dirs": dirs, "refs": refs, "eos": hf.config.eos_token_id}


def expected(world: dict[str, Any], prompt: list[int], adapter: str | None, n: int) -> list[int]:
    return hf_greedy(world["refs"][adapter], prompt, n, None)


def make_llm(world: dict[str, Any], register: list[str] = NAMES, **kw: Any) -> LLM:
    args = dict(dtype="float32", device="cpu", kv_cache_memory_bytes=2**26, max_lora_rank=8,
                adapter_roots=TMP_ROOTS, max_loras=2, max_num_seqs=8)  # CPU even on a GPU machine: its timings
    llm = LLM(str(world["base"]), **{**args, **kw})
    for name in register:
        llm.load_adapter(name, str(world["dirs"][name]))
    return llm


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


class SlowSource:
    """The real PEFT reader, delayed: each read of a name in ``names`` (all when None) sleeps ``delay``
    seconds after waiting for ``gate`` (open unless the test closes it)."""

    def __init__(self, delay: float = 0.0, names: set[str] | None = None):
        self.delay, self.names = delay, names
        self.gate = threading.Event()
        self.gate.set()
        self.started: dict[str, float] = {}
        self.reads: list[str] = []

    def __call__(self, name: str, *args: Any) -> LoRAWeights:
        if self.names is None or name in self.names:
            self.started.setdefault(name, time.monotonic())
            assert self.gate.wait(30)
            time.sleep(self.delay)
        self.reads.append(name)
        return load_peft_adapter(name, *args)


def slow_source(llm: LLM, **kw: Any) -> SlowSource:
    source = SlowSource(**kw)
    llm.engine.adapters.read_source = source
    return source


def evict_from_host(llm: LLM, names: list[str]) -> None:
    """Registering more adapters than ``max_cpu_loras`` left these at their source only."""
    for info in llm.list_adapters():
        if info.name in names:
            assert info.state == "registered", info


def drive(engine: LLMEngine, requests: list[tuple[str, list[int], str | None, int]],
          on_step: Any = None) -> dict[str, RequestOutput]:
    """Adds every request, steps until all finish; the last output of each (token ids accumulated)."""
    tokens: dict[str, list[int]] = {}
    last: dict[str, RequestOutput] = {}
    for rid, prompt, adapter, n in requests:
        engine.add_request(EngineRequest(rid, prompt_token_ids=prompt, params=greedy(n), adapter=adapter))
        tokens[rid] = []
    deadline = time.monotonic() + 120
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "engine did not finish"
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            last[out.request_id] = out
        assert not engine.take_failures()
        if on_step is not None:
            on_step(engine)
    return {rid: dataclasses.replace(out, new_token_ids=tokens[rid]) for rid, out in last.items()}


# ---- eviction -----------------------------------------------------------------------------------

def test_slots_of_running_requests_are_never_evicted(world: dict[str, Any]) -> None:
    llm = make_llm(world, max_loras=2)
    engine = llm.engine
    reqs = [("a-long", PROMPTS[0], "a", 24), ("b-long", PROMPTS[1], "b", 24)]
    reqs += [(f"{n}-{i}", PROMPTS[2 + i % 3], n, 3) for i, n in enumerate(["c", "d", "c", "a", "d", "b"])]
    slot_seen: dict[str, int] = {}
    violations: list[str] = []

    def check(engine: LLMEngine) -> None:
        active = {s.adapter for s in engine.scheduler.running if s.adapter is not None}
        if len(active) > 2:
            violations.append(f"{len(active)} adapters running with 2 slots")
        for seq in engine.scheduler.running:
            if seq.adapter is None:
                continue
            slot = engine.adapters.slot_of(seq.adapter)
            if slot is None or slot_seen.setdefault(seq.request_id, slot) != slot:
                violations.append(f"{seq.request_id}: slot {slot_seen.get(seq.request_id)} -> {slot}")

    outs = drive(engine, reqs, check)
    assert violations == []
    for rid, prompt, adapter, n in reqs:
        assert outs[rid].new_token_ids == expected(world, prompt, adapter, n), rid
    assert engine.adapters.counts().slot_evictions >= 2  # c and d did take slots, once a and b were idle
    assert engine.adapters.consistency_errors() == []
    assert_no_leaks(engine)


def test_claims_skip_active_writing_and_wanted_versions(world: dict[str, Any]) -> None:
    llm = make_llm(world, max_loras=2)
    reg = llm.engine.adapters
    a, b, c = (reg.acquire(n) for n in ("a", "b", "c"))
    slots = reg.ensure_resident([a, b])
    reg.set_active(a, 1)
    reg.set_wanted([b])
    assert reg.claim_slot(c) is None  # a runs, b is wanted next
    reg.set_wanted([c])  # a wanted version may evict one that only waiting requests hold
    slot = reg.claim_slot(c)
    assert slot == slots[b] and reg.slot_of(b) is None and reg.slot_status(c) is SlotStatus.WRITING
    assert reg.claim_slot(b) is None  # c's slot is being written, a's runs
    reg.write_slot(c, slot)
    assert reg.slot_status(c) is SlotStatus.READY and reg.slot_of(a) == slots[a]
    reg.set_active(a, -1)
    reg.set_wanted([])
    for v in (a, b, c):
        reg.release(v)
    assert reg.consistency_errors() == []


# ---- prefetch and the loader's ordering -----------------------------------------------------------

def test_prefetch_starts_on_arrival_and_fills_before_a_seat_is_free(world: dict[str, Any]) -> None:
    llm = make_llm(world, max_num_seqs=1, max_cpu_loras=1)
    evict_from_host(llm, ["a", "b", "c"])
    engine = llm.engine
    source = slow_source(llm, names={"a"})
    source.gate.clear()
    engine.add_request(EngineRequest("base", prompt_token_ids=PROMPTS[0], params=greedy(40)))
    engine.step()
    engine.add_request(EngineRequest("on-a", prompt_token_ids=PROMPTS[1], params=greedy(6), adapter="a"))
    deadline = time.monotonic() + 5
    while "a" not in source.started:  # no step in between: the read starts on arrival
        assert time.monotonic() < deadline, "the adapter's read did not start on arrival"
        time.sleep(0.005)
    version = engine.scheduler.waiting[0].adapter
    assert engine.adapters.loading_names() == ["a"]
    source.gate.set()
    while engine.adapters.slot_status(version) is not SlotStatus.READY:  # written while "base" holds the seat
        assert [s.request_id for s in engine.scheduler.running] == ["base"], "the slot was not filled in time"
        engine.step()
    tokens: dict[str, list[int]] = {"base": [], "on-a": []}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert tokens["on-a"] == expected(world, PROMPTS[1], "a", 6)
    assert source.reads == ["a"]
    stats = engine.snapshot
    assert (stats.adapter_slot_lookups, stats.adapter_slot_hits, stats.adapter_cpu_lookups,
            stats.adapter_cpu_hits) == (1, 0, 1, 0)
    assert_no_leaks(engine)


def slow_writes(llm: LLM, delay: float) -> tuple[set[int], list[tuple[str, int, float, float]]]:
    """Slot writes in two halves with ``delay`` between them; returns (slots being written now, log)."""
    slots = llm.engine.adapters.slots
    write = slots.load
    writing: set[int] = set()
    log: list[tuple[str, int, float, float]] = []

    def load(slot: int, w: LoRAWeights) -> None:
        start = time.monotonic()
        writing.add(slot)
        half = dict(list(w.weights.items())[: len(w.weights) // 2])
        write(slot, dataclasses.replace(w, weights=half))  # half of the modules: not this adapter yet
        time.sleep(delay)
        write(slot, w)
        writing.discard(slot)
        log.append((w.name, slot, start, time.monotonic()))

    slots.load = load  # type: ignore[method-assign]
    return writing, log


def test_no_step_reads_a_half_written_slot(world: dict[str, Any]) -> None:
    reqs = [("base-0", PROMPTS[0], None, 90), ("base-1", PROMPTS[3], None, 90)]
    reqs += [(f"{n}-{i}", PROMPTS[i % 5], n, 6) for i, n in enumerate(["a", "b", "c", "d", "a", "c"])]
    reference = drive(make_llm(world, max_cpu_loras=1).engine, reqs)
    llm = make_llm(world, max_cpu_loras=1)
    evict_from_host(llm, ["a", "b", "c"])
    slow_source(llm, delay=0.05)
    writing, log = slow_writes(llm, delay=0.05)
    engine = llm.engine
    launch = engine.runner.launch
    reads: list[tuple[float, set[int]]] = []  # (when, slots the step reads)
    bad: list[str] = []

    def checked_launch(sched: Any, defer: bool = False) -> Any:
        used = {r.lora_slot for r in sched.requests if r.lora_slot >= 0}
        if used & writing:
            bad.append(f"a step read slots {sorted(used & writing)} while they were being written")
        reads.append((time.monotonic(), used))
        return launch(sched, defer)

    engine.runner.launch = checked_launch  # type: ignore[method-assign]
    outs = drive(engine, reqs)
    assert bad == []
    assert {rid: o.new_token_ids for rid, o in outs.items()} == {rid: o.new_token_ids for rid, o in reference.items()}
    assert len(log) >= 4
    during = [t for t, _ in reads if any(start < t < end for _, _, start, end in log)]
    assert during, "no step ran while slots were written: the writes were not off the critical path"
    for rid, prompt, adapter, n in reqs[2:]:
        assert outs[rid].new_token_ids == expected(world, prompt, adapter, n), rid
    assert engine.adapters.consistency_errors() == []
    assert_no_leaks(engine)


# ---- admission bounds -----------------------------------------------------------------------------

@pytest.mark.parametrize("bound", ["bypass", "wait"])
def test_a_request_waiting_for_its_adapter_is_not_starved(world: dict[str, Any], bound: str) -> None:
    limits = {"max_admission_bypass": 3} if bound == "bypass" else {"max_admission_wait": 0.3}
    llm = make_llm(world, max_num_seqs=2, max_cpu_loras=1, **limits)
    evict_from_host(llm, ["a", "b", "c"])
    slow_source(llm, delay=1.5, names={"a"})
    n = 4 if bound == "bypass" else 30  # base traffic outlasts the 0.3 s bound even on a fast machine
    reqs = [("slow", PROMPTS[0], "a", 4)] + [(f"base-{i}", PROMPTS[1 + i % 4], None, n) for i in range(40)]
    outs = drive(llm.engine, reqs)
    admitted_at = outs["slow"].timings.first_scheduled
    ahead = [rid for rid, o in outs.items() if rid != "slow" and o.timings.first_scheduled < admitted_at]
    if bound == "bypass":
        assert len(ahead) == 3, ahead
    else:  # passed over for 0.3 s (and one step), then no one else went ahead until the load ended
        arrived = outs["slow"].timings.arrival
        assert ahead and all(outs[r].timings.first_scheduled < arrived + 0.3 + 0.25 for r in ahead), ahead
        assert len(ahead) < 40
    assert admitted_at - outs["slow"].timings.arrival >= 1.4  # it did wait for its load
    assert llm.engine.snapshot.adapter_admissions_overdue == 1
    assert outs["slow"].new_token_ids == expected(world, PROMPTS[0], "a", 4)
    assert_no_leaks(llm.engine)


def test_resident_adapters_go_first_while_others_load(world: dict[str, Any]) -> None:
    llm = make_llm(world, max_num_seqs=2, max_cpu_loras=1, max_loras=3)
    evict_from_host(llm, ["a", "b", "c"])
    slow_source(llm, delay=0.5, names={"a"})
    reqs = [("slow", PROMPTS[0], "a", 4)] + [(f"d-{i}", PROMPTS[1 + i % 4], "d", 4) for i in range(6)]
    outs = drive(llm.engine, reqs)
    first = min(o.timings.first_scheduled for rid, o in outs.items() if rid != "slow")
    assert first < outs["slow"].timings.first_scheduled  # d (in host memory) did not wait behind a's read
    assert llm.engine.snapshot.adapter_admissions_overdue == 0
    for rid, prompt, adapter, n in reqs:
        assert outs[rid].new_token_ids == expected(world, prompt, adapter, n), rid


def test_an_engine_waiting_only_on_loads_does_not_spin(world: dict[str, Any]) -> None:
    llm = make_llm(world, max_cpu_loras=1)
    evict_from_host(llm, ["a", "b", "c"])
    slow_source(llm, delay=0.6)
    steps = llm.engine.stats.num_steps
    start = time.monotonic()
    out = llm.generate([PROMPTS[0]], greedy(3), adapters=["a"])
    assert time.monotonic() - start >= 0.6
    assert llm.engine.stats.num_steps - steps < 150  # about one step per 10 ms of waiting, not thousands
    assert out[0].token_ids == expected(world, PROMPTS[0], "a", 3)


# ---- failed loads ----------------------------------------------------------------------------------

@pytest.fixture
def breakable(world: dict[str, Any], tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """A private copy of adapter "a" the test may break, and the engine config to serve it."""
    import shutil

    path = Path(shutil.copytree(world["dirs"]["a"], tmp_path / "a"))
    cfg = EngineConfig.from_kwargs(model=str(world["base"]), dtype="float32", device="cpu", kv_cache_memory_bytes=2**26,
                                   max_lora_rank=8, adapter_roots=TMP_ROOTS, max_loras=2, max_cpu_loras=1)
    yield path, cfg


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_failed_load_fails_only_the_requests_waiting_on_it(world: dict[str, Any], breakable: Any,
                                                             damage: str) -> None:
    path, cfg = breakable

    async def run() -> dict[str, Any]:
        engine = AsyncEngine(cfg)
        await engine.start()
        engine.engine.adapters.register("a", str(path))
        engine.engine.adapters.register("b", str(world["dirs"]["b"]))  # a leaves host memory
        if damage == "changed":
            make_peft_adapter(world["refs"][None], path, r=4, alpha=8, targets=TARGETS, seed=99)
        else:
            (path / "adapter_model.safetensors").unlink()

        async def one(rid: str, prompt: list[int], adapter: str | None) -> Any:
            tokens: list[int] = []
            try:
                async for out in engine.generate(EngineRequest(rid, prompt_token_ids=prompt, params=greedy(6),
                                                               adapter=adapter)):
                    tokens += out.new_token_ids
            except AdapterLoadError as e:
                return e
            return tokens

        jobs = [("a-0", PROMPTS[0], "a"), ("b-0", PROMPTS[1], "b"), ("a-1", PROMPTS[2], "a"),
                ("base", PROMPTS[3], None), ("b-1", PROMPTS[4], "b")]
        results = await asyncio.gather(*(one(*j) for j in jobs))
        after = await one("b-after", PROMPTS[0], "b")
        healthy = engine.is_healthy()
        await engine.shutdown()
        return {"results": dict(zip([j[0] for j in jobs], results, strict=True)), "after": after,
                "healthy": healthy, "engine": engine.engine}

    got = asyncio.run(run())
    res = got["results"]
    for rid in ("a-0", "a-1"):
        assert isinstance(res[rid], AdapterLoadError), res[rid]
        assert res[rid].name == "a" and ("changed since" if damage == "changed" else "missing") in str(res[rid])
    assert res["b-0"] == expected(world, PROMPTS[1], "b", 6) and res["b-1"] == expected(world, PROMPTS[4], "b", 6)
    assert res["base"] == expected(world, PROMPTS[3], None, 6)
    assert got["after"] == expected(world, PROMPTS[0], "b", 6) and got["healthy"]
    assert_no_leaks(got["engine"])
    assert got["engine"].adapters.consistency_errors() == []


def test_offline_generate_raises_the_load_error_and_stays_usable(world: dict[str, Any], breakable: Any) -> None:
    path, cfg = breakable
    llm = make_llm(world, register=["b"], max_cpu_loras=1)
    llm.load_adapter("a", str(path))
    llm.load_adapter("c", str(world["dirs"]["c"]))  # a leaves host memory
    (path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterLoadError, match="adapter 'a'"):
        llm.generate(PROMPTS[:2], greedy(4), adapters=["a", "b"])
    assert llm.generate([PROMPTS[1]], greedy(4), adapters=["b"])[0].token_ids == expected(world, PROMPTS[1], "b", 4)
    assert_no_leaks(llm.engine)


def test_abort_and_unload_while_its_load_is_queued(world: dict[str, Any]) -> None:
    llm = make_llm(world, max_cpu_loras=1, adapter_load_threads=1)
    evict_from_host(llm, ["a", "b", "c"])
    engine, reg = llm.engine, llm.engine.adapters
    source = slow_source(llm, names={"b"})
    source.gate.clear()  # b's read holds the one loader thread; a's waits behind it
    engine.add_request(EngineRequest("on-b", prompt_token_ids=PROMPTS[1], params=greedy(3), adapter="b"))
    engine.add_request(EngineRequest("on-a", prompt_token_ids=PROMPTS[0], params=greedy(3), adapter="a"))
    version = engine.scheduler.waiting[1].adapter
    engine.abort("on-a")
    reg.unregister("a")  # retired, no request holds it: freed once its queued load is done, not before
    counts = reg.counts()
    assert (counts.loads_in_flight, counts.retired_versions) == (2, 1) and reg.consistency_errors() == []
    source.gate.set()
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    deadline = time.monotonic() + 5
    while reg.counts().loads_in_flight:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert tokens == expected(world, PROMPTS[1], "b", 3) and source.reads == ["b"]  # a was never read
    assert version.weights is None and reg.slot_of(version) is None
    assert reg.counts().retired_versions == 0 and reg.consistency_errors() == []
    assert_no_leaks(engine)


# ---- thousands of adapters ---------------------------------------------------------------------------

@pytest.mark.slow
def test_two_thousand_registered_adapters_with_a_small_host_cache(world: dict[str, Any]) -> None:
    root: Path = world["root"] / "many"
    clones = [clone_peft_adapter(world["dirs"]["a"], root / f"m{i}", seed=1000 + i) for i in range(2000)]
    llm = make_llm(world, register=[], max_loras=4, max_cpu_loras=16, max_num_seqs=6)
    reg = llm.engine.adapters
    for i, path in enumerate(clones):
        reg.register(f"m{i}", str(path))
    counts = reg.counts()
    assert counts.adapters_registered == 2000 and counts.adapters_cached <= 16 and counts.cpu_evictions >= 1984
    rng = random.Random(0)
    used = [rng.choice([0, 1, 2, 1999, 1500, 7, 1, 0, 42, 1999]) for _ in range(30)]  # repeats, some cold
    prompts = [PROMPTS[i % 5] for i in range(len(used))]
    loads_before = reg.counts().source_loads
    outs = llm.generate(prompts, greedy(4), adapters=[f"m{i}" for i in used])
    hf = world["refs"][None]
    for i in sorted(set(used)):
        ref = PeftModel.from_pretrained(copy.deepcopy(hf), clones[i]).eval()
        for out, prompt, j in zip(outs, prompts, used, strict=True):
            if j == i:
                assert out.token_ids == hf_greedy(ref, prompt, 4, None), f"m{i}"
    counts = reg.counts()
    assert counts.source_loads - loads_before >= len(set(used)) - 1  # re-read from disk (one may be cached)
    assert counts.adapters_cached <= 16 and reg.consistency_errors() == []
    stats = llm.engine.snapshot
    assert stats.adapter_slot_lookups == 30 and stats.adapter_slot_hits + stats.adapter_cpu_lookups == 30
    assert_no_leaks(llm.engine)


def test_host_cache_lru_by_last_use_over_many_adapters(world: dict[str, Any]) -> None:
    root: Path = world["root"] / "lru"
    clones = [clone_peft_adapter(world["dirs"]["b"], root / f"l{i}", seed=i) for i in range(12)]
    llm = make_llm(world, register=[], max_loras=2, max_cpu_loras=4)
    reg = llm.engine.adapters
    for i, path in enumerate(clones):
        reg.register(f"l{i}", str(path))
    cached = [i.name for i in reg.list() if i.state != "registered"]
    assert sorted(cached) == ["l10", "l11", "l8", "l9"]  # the last registered
    for name in ("l11", "l10", "l9", "l8"):  # last use now l11 (oldest) .. l8; l9 and l8 keep the slots
        llm.generate([PROMPTS[0]], greedy(2), adapters=[name])
    reg.register("l12", str(clones[0]))  # one more: the least recently used goes (l11, not l8)
    states = {i.name: i.state for i in reg.list()}
    assert states["l11"] == "registered"
    assert all(states[n] != "registered" for n in ("l8", "l9", "l10", "l12")), states
    assert reg.consistency_errors() == []


# ---- metrics -------------------------------------------------------------------------------------------

def test_loading_metrics_are_exported(world: dict[str, Any]) -> None:
    llm = make_llm(world, max_cpu_loras=1)
    evict_from_host(llm, ["a", "b", "c"])
    llm.generate(PROMPTS[:4], greedy(2), adapters=["a", "a", "d", None])
    llm.generate(PROMPTS[:1], greedy(2), adapters=["a"])
    llm.engine.publish_stats()
    stats = llm.engine.snapshot
    assert (stats.adapter_slot_lookups, stats.adapter_slot_hits) == (4, 1)  # the second call finds "a" in its slot
    assert (stats.adapter_cpu_lookups, stats.adapter_cpu_hits) == (3, 1)  # a, a (both read it), d (in host memory)
    text = generate_latest(Metrics(lambda: stats, model_name="m").registry).decode()
    for line in ('loraplex_lora_slot_hits_total{model_name="m"} 1.0',
                 'loraplex_lora_slot_lookups_total{model_name="m"} 4.0',
                 'loraplex_lora_cpu_cache_hits_total{model_name="m"} 1.0',
                 'loraplex_lora_slot_hit_ratio{model_name="m"} 0.25',
                 'loraplex_lora_loads_in_flight{model_name="m"} 0.0',
                 'loraplex_lora_admissions_overdue_total{model_name="m"} 0.0',
                 # registering 4 adapters and reading "a" back
                 'loraplex_lora_adapter_load_duration_seconds_count{model_name="m",stage="source"} 5.0',
                 'loraplex_lora_adapter_load_duration_seconds_count{model_name="m",stage="slot"} 2.0'):
        assert line in text, line
