"""Greedy outputs of the engine are token-identical to HF transformers run on each prompt alone."""

from __future__ import annotations

import random

import pytest

from loraplex import LLM, SamplingParams
from tests.engine_factory import assert_no_leaks, hf_greedy, load_hf, write_tiny_model

MAX_NEW = 12


def _prompts(vocab: int, n: int = 9, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 7, 16, 17, 31, 40, 5, 64][:n]
    return [[rng.randrange(3, vocab - 1) for _ in range(length)] for length in lengths]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    hf = load_hf(path)
    prompts = _prompts(hf.config.vocab_size)
    expected = [hf_greedy(hf, p, MAX_NEW, hf.config.eos_token_id) for p in prompts]
    return path, prompts, expected


SETTINGS = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 8},
    "preemption": {"num_gpu_blocks_override": 24, "block_size": 4, "max_num_batched_tokens": 64},
    "no_prefix_cache": {"enable_prefix_caching": False},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_matches_hf(tiny, setting):
    path, prompts, expected = tiny
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=2**26, enable_lora=False, **SETTINGS[setting])
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    for out, exp in zip(outs, expected, strict=True):
        assert out.token_ids == exp
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm.engine)


def test_prefix_cache_hits_and_matches_hf(tiny):
    path, prompts, _ = tiny
    hf = load_hf(path)
    shared = prompts[-1][:48]
    batch = [shared + p[:5] for p in prompts[:8]]
    expected = [hf_greedy(hf, p, 6, hf.config.eos_token_id) for p in batch]
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=2**26, enable_lora=False, block_size=16)
    first = llm.generate(batch[:1], SamplingParams(temperature=0.0, max_tokens=6))
    rest = llm.generate(batch[1:], SamplingParams(temperature=0.0, max_tokens=6))
    outs = first + rest
    assert [o.token_ids for o in outs] == expected
    assert all(o.usage.cached_tokens >= 48 for o in rest)
    assert llm.engine.kv.prefix_hits > 0
    assert_no_leaks(llm.engine)
