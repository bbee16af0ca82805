"""Sampling through the engine: seeds, logprobs, stops, detokenized text."""

from __future__ import annotations

from loraplex import SamplingParams
from tests.engine_factory import assert_no_leaks

TINY_MODEL = "qwen3"  # the `llm` fixture of tests/conftest.py
ENGINE_ARGS = {"enable_lora": False, "max_num_seqs": 32}


def test_same_seed_same_tokens_alone_and_in_a_batch_of_16(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([[11, 12, 13, 14]], seeded)[0].token_ids
    others = [SamplingParams(temperature=1.0, seed=None, max_tokens=7 + i % 5, ignore_eos=True) for i in range(15)]
    prompts = [[11, 12, 13, 14]] + [[20 + i] * (1 + i) for i in range(15)]
    batch = llm.generate(prompts, [seeded] + others)
    assert batch[0].token_ids == alone
    assert_no_leaks(llm.engine)


def test_logprobs_and_prompt_logprobs(llm):
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3,
                                                      prompt_logprobs=2, ignore_eos=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for lp, tok in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == tok and lp.rank == 1 and len(lp.top) == 3 and lp.logprob <= 0
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == 4
    assert out.prompt_logprobs[0] is None
    assert [lp.token_id for lp in out.prompt_logprobs[1:]] == [6, 7, 8]


def test_stop_strings_tokens_and_lengths(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    full = llm.generate([[30, 31, 32]], greedy)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 16
    stop_tok = full.token_ids[5]
    first = full.token_ids.index(stop_tok)
    by_token = llm.generate([[30, 31, 32]], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                           stop_token_ids=[stop_tok]))[0]
    assert by_token.finish_reason == "stop" and by_token.stop_reason == stop_tok
    assert by_token.token_ids == full.token_ids[:first + 1]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        by_text = llm.generate([[30, 31, 32]], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                              stop=[stop]))[0]
        assert by_text.finish_reason == "stop" and by_text.stop_reason == stop
        assert by_text.text == text[:text.index(stop)]
    min_tok = llm.generate([[30, 31, 32]], SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16,
                                                          ignore_eos=True, stop_token_ids=[stop_tok]))[0]
    assert len(min_tok.token_ids) == 16
    assert_no_leaks(llm.engine)


def test_text_equals_decoding_the_tokens(llm):
    out = llm.generate(["hello world"], SamplingParams(temperature=0.8, seed=3, max_tokens=24))[0]
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.usage.prompt_tokens == len(llm.tokenizer.encode("hello world"))
    assert out.usage.completion_tokens == len(out.token_ids)
