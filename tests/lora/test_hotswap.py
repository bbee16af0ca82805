"""Hot-swap under traffic, and bad adapters refused while other requests run unaffected."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil

import pytest
from peft import PeftModel

from loraplex.backend.engine.async_engine import AsyncEngine
from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.sampling_params import SamplingParams
from loraplex.config import EngineConfig
from loraplex.errors import AdapterLoadError, AdapterNotFoundError, AdapterSourceForbiddenError
from tests.engine_factory import assert_no_leaks, hf_greedy, load_hf, write_tiny_model
from tests.lora.test_peft_refusals import CASES
from tests.lora_factory import make_peft_adapter

PROMPTS = [[5, 9, 17, 33, 2], [40, 41, 42], [7] * 11, [100, 3, 8, 21]]
GEN = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    base_dir = write_tiny_model(root / "base", "llama")
    hf = load_hf(base_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    dirs = {name: make_peft_adapter(hf, root / "adapters" / name, r=8, alpha=16, targets=targets, seed=seed)
            for name, seed in [("a1", 1), ("a2", 2), ("b", 3), ("c", 4)]}
    qkv = make_peft_adapter(hf, root / "qkv", r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj"], seed=5)

    def expected(adapter: str) -> list[list[int]]:
        ref = PeftModel.from_pretrained(copy.deepcopy(hf), dirs[adapter]).eval()
        return [hf_greedy(ref, p, GEN.max_tokens, None) for p in PROMPTS]

    return root, base_dir, dirs, qkv, {"a1": expected("a1"), "a2": expected("a2")}


def make_engine(base_dir, root, **kw) -> AsyncEngine:
    cfg = EngineConfig.from_kwargs(model=str(base_dir), dtype="float32", kv_cache_memory_bytes=2**26, max_loras=2, max_lora_rank=8,
                                   adapter_roots=[str(root / "adapters"), str(root / "bad")], **kw)
    return AsyncEngine(cfg)


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], adapter: str | None,
                  started: asyncio.Event | None = None) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(EngineRequest(rid, prompt_token_ids=prompt, params=GEN, adapter=adapter)):
        tokens += out.new_token_ids
        if started is not None and len(tokens) >= 3:
            started.set()
    return tokens


def test_hot_swap_while_streaming(world):
    root, base_dir, dirs, _, expected = world

    async def scenario() -> None:
        engine = make_engine(base_dir, root)
        await engine.start()
        await engine.load_adapter("A", str(dirs["a1"]))
        await engine.load_adapter("C", str(dirs["c"]))
        started = asyncio.Event()
        old = [asyncio.create_task(collect(engine, f"old{i}", p, "A", started)) for i, p in enumerate(PROMPTS)]
        busy_c = asyncio.create_task(collect(engine, "c0", PROMPTS[0], "C"))
        await started.wait()
        info = await engine.load_adapter("A", str(dirs["a2"]), replace=True)  # reload: version 2
        assert info.version == 2
        await engine.load_adapter("B", str(dirs["b"]))
        await engine.unload_adapter("C")  # in use by c0: it finishes on its version
        new = [asyncio.create_task(collect(engine, f"new{i}", p, "A")) for i, p in enumerate(PROMPTS)]
        assert await asyncio.gather(*old) == expected["a1"]
        assert await asyncio.gather(*new) == expected["a2"]
        assert len(await busy_c) == GEN.max_tokens
        with pytest.raises(AdapterNotFoundError):
            await collect(engine, "gone", PROMPTS[0], "C")
        await engine.unload_adapter("A")
        await engine.unload_adapter("B")
        await asyncio.sleep(0.2)
        counts = engine.engine.adapters.counts()
        assert counts.lora_slots_used == 0 and counts.adapters_registered == 0
        assert counts.retired_versions == 0
        assert_no_leaks(engine.engine)
        await engine.shutdown()

    asyncio.run(scenario())


def _bad_sources(root, qkv) -> list[tuple[str, str, type]]:
    """(name, source, error) for each refusal that needs no special config."""
    bad_root = root / "bad"
    out = []
    for case, (mutate, cfg, spec, error, _) in CASES.items():
        if cfg or spec or mutate is None:
            continue
        path = bad_root / case
        if not path.exists():
            shutil.copytree(qkv, path)
            mutate(path)
        out.append((case, str(path), error))
    outside = root / "qkv"
    (bad_root / "link").unlink(missing_ok=True)
    os.symlink(outside, bad_root / "link")
    out += [("dotdot", str(root / "adapters" / ".." / "qkv"), AdapterSourceForbiddenError),
            ("absolute-outside", str(outside), AdapterSourceForbiddenError),
            ("symlink-out", str(bad_root / "link"), AdapterSourceForbiddenError),
            ("encoded", str(root / "adapters") + "/%2e%2e/qkv", AdapterLoadError)]
    return out


def test_bad_adapters_refused_while_traffic_runs(world):
    root, base_dir, dirs, qkv, expected = world
    bad = _bad_sources(root, qkv)

    async def scenario() -> None:
        engine = make_engine(base_dir, root)
        await engine.start()
        await engine.load_adapter("A", str(dirs["a1"]))
        traffic = [asyncio.create_task(collect(engine, f"t{i}", p, "A")) for i, p in enumerate(PROMPTS)]
        for name, source, error in bad:
            with pytest.raises(error):
                await engine.load_adapter(f"bad-{name}", source)
            assert engine.is_healthy()
        assert await asyncio.gather(*traffic) == expected["a1"]
        assert [a.name for a in await engine.list_adapters()] == ["A"]
        assert_no_leaks(engine.engine)
        await engine.shutdown()

    assert len(bad) > 30
    asyncio.run(scenario())
