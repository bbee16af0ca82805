"""Tensor parallelism on CPU (gloo): ``tensor_parallel_size=2`` worker processes give the same greedy
tokens as one process in float32, with mixed-adapter batches (real PEFT adapters), hot swaps while
requests stream, and a clear error plus a dead engine when a worker process is killed."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from peft import PeftModel

from loraplex import LLM, SamplingParams
from loraplex.backend.distributed.executor import TPEngine, WorkerDiedError
from loraplex.backend.distributed.shard import ShardPlan
from loraplex.backend.engine.async_engine import AsyncEngine
from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.models.llama import ArchSpec
from loraplex.config import EngineConfig
from loraplex.errors import ConfigError, EngineDeadError, InvalidRequestError
from tests.engine_factory import assert_no_leaks, hf_greedy, load_hf, write_tiny_model
from tests.lora_factory import make_peft_adapter

PROMPTS = [[5, 9, 17, 33, 2], [40, 41, 42], [7] * 11, [100, 3, 8, 21], [60, 61, 62, 63, 64, 65], [9, 9]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
ENGINE = dict(dtype="float32", kv_cache_memory_bytes=2**24, max_lora_rank=16)

# (architecture, overrides): Llama with one KV head for two ranks (the KV head replicated on both),
# Qwen3 (q/k norm, tied embeddings, head_dim != hidden/heads) with one KV head per rank
MODELS = {"llama-kv1": ("llama", {"num_key_value_heads": 1}), "qwen3": ("qwen3", {})}


@pytest.fixture(scope="module", params=sorted(MODELS))
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    arch, overrides = MODELS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = write_tiny_model(root / "base", arch, **overrides)
    hf = load_hf(base)
    adapters = {"a": make_peft_adapter(hf, root / "adapters" / "a", r=8, alpha=16, targets="all-linear", seed=1),
                "b": make_peft_adapter(hf, root / "adapters" / "b", r=16, alpha=8,
                                       targets=["q_proj", "v_proj", "o_proj", "down_proj"], seed=2)}
    return base, adapters


def _mixed_batch(llm: LLM) -> list[list[int]]:
    adapters = ["a", None, "b", "a", None, "b"]
    params = [GREEDY] * 5 + [SamplingParams(temperature=0.7, seed=11, max_tokens=20, ignore_eos=True)]
    return [o.token_ids for o in llm.generate(PROMPTS, params, adapters=adapters)]


@pytest.mark.slow  # about 20 s per model on a 2-core machine
def test_tp2_matches_tp1_with_mixed_adapters(world: tuple[Path, dict[str, Path]]) -> None:
    """Greedy rows (base and two adapters, one of them touching only some projections) and one
    seeded sampled row: every rank samples from the same gathered logits, so the ranks stay in step."""
    base, adapters = world
    results = {}
    for n in (1, 2):
        llm = LLM(str(base), tensor_parallel_size=n, adapter_roots=[str(base.parent)], **ENGINE)
        for name, path in adapters.items():
            llm.load_adapter(name, path)
        results[n] = _mixed_batch(llm)
        assert_no_leaks(llm.engine)
        if n == 2:
            assert isinstance(llm.engine, TPEngine) and len(llm.engine.runner.pids) == 2
            llm.engine.shutdown()
    assert results[2] == results[1]
    assert len({tuple(t) for t in results[1]}) == len(PROMPTS)  # adapters change the outputs


def test_shard_plan_replicates_kv_heads_when_fewer_than_ranks() -> None:
    spec = ArchSpec(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=8, num_kv_heads=2,
                    head_dim=8, rms_norm_eps=1e-6, max_positions=64, attention_bias=False, qk_norm=False,
                    tie_word_embeddings=False, sliding_window=None)
    plans = [ShardPlan.build(spec, r, 4) for r in range(4)]
    assert [(p.heads, p.kv_heads, p.kv_start) for p in plans] == [(2, 1, 0), (2, 1, 0), (2, 1, 1), (2, 1, 1)]
    assert [p.module_slice("q_proj") for p in plans] == [("out", 16 * r, 16) for r in range(4)]
    assert plans[3].module_slice("down_proj") == ("in", 96, 32)
    assert plans[0].vocab_per_rank == 26  # ceil(101 / 4): the last rank pads
    with pytest.raises(ConfigError, match="num_attention_heads=8"):
        ShardPlan.build(spec, 0, 3)


def test_uneven_model_is_refused_before_any_worker_starts(world: tuple[Path, dict[str, Path]]) -> None:
    base, _ = world
    with pytest.raises(ConfigError, match="tensor_parallel_size=3"):
        LLM(str(base), tensor_parallel_size=3, **ENGINE)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig.from_kwargs(tensor_parallel_size=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("plain") / "base", "llama")


# ---- hot swap and worker death through the engine client (the core on a thread, workers spawned)

def _async_engine(base: Path, **kw: Any) -> AsyncEngine:
    return AsyncEngine(EngineConfig.from_kwargs(model=str(base), tensor_parallel_size=2,
                                                adapter_roots=[str(base.parent)], **{**ENGINE, **kw}))


async def _collect(engine: AsyncEngine, rid: str, prompt: list[int], adapter: str | None,
                   started: asyncio.Event | None = None, params: SamplingParams = GREEDY) -> tuple[list[int], Any]:
    tokens: list[int] = []
    last = None
    async for out in engine.generate(EngineRequest(rid, prompt_token_ids=prompt, params=params, adapter=adapter)):
        tokens += out.new_token_ids
        last = out
        if started is not None and len(tokens) >= 3:
            started.set()
    return tokens, last


@pytest.mark.slow
def test_hot_swap_during_generation_is_atomic_across_ranks(world: tuple[Path, dict[str, Path]]) -> None:
    """Two slots for three adapters: a reload of "x" (new weights) while its old version streams,
    loads and evictions in between; each request gets the tokens of its own version (HF + PEFT)."""
    base, adapters = world
    hf = load_hf(base)

    def expected(path: Path) -> list[list[int]]:
        ref = PeftModel.from_pretrained(copy.deepcopy(hf), path).eval()
        return [hf_greedy(ref, p, GREEDY.max_tokens, None) for p in PROMPTS[:3]]

    want_a, want_b = expected(adapters["a"]), expected(adapters["b"])

    async def scenario() -> None:
        engine = _async_engine(base, max_loras=2)
        await engine.start()
        try:
            await engine.load_adapter("x", str(adapters["a"]))
            started = asyncio.Event()
            old = [asyncio.create_task(_collect(engine, f"old{i}", p, "x", started)) for i, p in enumerate(PROMPTS[:3])]
            await started.wait()
            info = await engine.load_adapter("x", str(adapters["b"]), replace=True)
            assert info.version == 2
            await engine.load_adapter("y", str(adapters["a"]))
            new = [asyncio.create_task(_collect(engine, f"new{i}", p, "x")) for i, p in enumerate(PROMPTS[:3])]
            also = [asyncio.create_task(_collect(engine, f"y{i}", p, "y")) for i, p in enumerate(PROMPTS[:3])]
            assert [t for t, _ in await asyncio.gather(*old)] == want_a
            assert [t for t, _ in await asyncio.gather(*new)] == want_b
            assert [t for t, _ in await asyncio.gather(*also)] == want_a
            await engine.unload_adapter("y")
            assert [t for t, _ in [await _collect(engine, "after", PROMPTS[0], "x")]] == want_b[:1]
            assert engine.is_healthy()
        finally:
            await engine.shutdown()
            engine.engine.shutdown()  # type: ignore[attr-defined]
        assert_no_leaks(engine.engine)

    asyncio.run(asyncio.wait_for(scenario(), 300))


def test_killed_worker_fails_requests_and_health(llama: Path) -> None:
    base = llama

    async def scenario() -> None:
        engine = _async_engine(base)
        await engine.start()
        try:
            with pytest.raises(InvalidRequestError, match="structured outputs"):
                await _collect(engine, "json", PROMPTS[0], None,
                               params=SamplingParams(max_tokens=4, structured_outputs={"json_object": True}))
            started = asyncio.Event()
            long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
            task = asyncio.create_task(_collect(engine, "doomed", PROMPTS[0], None, started, params=long))
            await started.wait()
            victim = engine.engine.runner.pids[1]  # type: ignore[attr-defined]
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            tokens, last = await asyncio.wait_for(task, 30)
            assert time.monotonic() - t0 < 10
            assert last.finished and len(tokens) < 400
            assert "rank 1" in last.error and "SIGKILL" in last.error and str(victim) in last.error, last.error
            deadline = time.monotonic() + 10
            while engine.is_healthy() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not engine.is_healthy() and "tensor-parallel worker" in engine.dead_reason()
            with pytest.raises(EngineDeadError):
                await _collect(engine, "after", PROMPTS[0], None)
        finally:
            await engine.shutdown()
        assert all(not p.is_alive() for p in engine.engine.runner.procs)  # type: ignore[attr-defined]

    asyncio.run(asyncio.wait_for(scenario(), 300))


def test_worker_death_while_idle_flips_health(llama: Path) -> None:
    base = llama

    async def scenario() -> None:
        engine = _async_engine(base, enable_lora=False)
        await engine.start()
        try:
            assert (await _collect(engine, "warm", PROMPTS[1], None))[1].error is None
            os.kill(engine.engine.runner.pids[0], signal.SIGKILL)  # type: ignore[attr-defined]
            deadline = time.monotonic() + 10
            while engine.is_healthy() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not engine.is_healthy() and "rank 0" in engine.dead_reason()
        finally:
            await engine.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 300))


def test_llm_raises_worker_died(llama: Path) -> None:
    base = llama
    llm = LLM(str(base), tensor_parallel_size=2, enable_lora=False, **{k: v for k, v in ENGINE.items()
                                                                       if k != "max_lora_rank"})
    runner = llm.engine.runner
    os.kill(runner.pids[1], signal.SIGKILL)  # type: ignore[attr-defined]
    with pytest.raises(WorkerDiedError, match="rank 1"):
        llm.generate(PROMPTS[:2], GREEDY)
    assert not llm.engine.seqs
