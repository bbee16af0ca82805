"""The input step (one function per request: template, character bound, tokens, limits) and the
per-step stats snapshot (published once per step, never mutated after, adapter gauges fresh after
adapter operations)."""

from __future__ import annotations

import time

import pytest

from loraplex import LLM, SamplingParams
from loraplex.backend.demo import DEMO_ADAPTERS
from loraplex.backend.engine.request import ChatInput, EngineRequest
from loraplex.errors import InvalidRequestError


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(device="cpu", max_model_len=128, max_num_seqs=4, kv_cache_memory_bytes=8 * 2**20)


def test_chat_is_rendered_once_by_the_input_step(llm: LLM) -> None:
    inputs = llm.engine.input_processor
    chat = ChatInput([{"role": "user", "content": "hello"}])
    proc = inputs.process(EngineRequest("c1", chat=chat, params=SamplingParams(max_tokens=4)))
    rendered = llm.apply_chat_template([{"role": "user", "content": "hello"}])
    assert proc.prompt_token_ids == list(llm.engine.tokenizer.encode(rendered))
    assert inputs.tokenize(None, chat.messages, None, None, True) == proc.prompt_token_ids
    assert proc.max_tokens == 4 and proc.request_id == "c1"


@pytest.mark.parametrize("request_kwargs", [
    {"prompt": "y" * 2_000_000},
    {"chat": ChatInput([{"role": "user", "content": "y" * 2_000_000}])},
], ids=["prompt", "chat"])
def test_huge_inputs_fail_by_characters_before_tokenizing(llm: LLM, request_kwargs: dict) -> None:  # type: ignore[type-arg]
    start = time.monotonic()
    with pytest.raises(InvalidRequestError) as err:
        llm.engine.input_processor.process(EngineRequest("big", **request_kwargs))
    assert "cannot fit in max_model_len=128" in err.value.message
    assert time.monotonic() - start < 0.05


def test_the_character_bound_never_refuses_a_prompt_that_fits(llm: LLM) -> None:
    inputs = llm.engine.input_processor
    assert inputs.max_prompt_chars >= 128 * max(len(t) for t in llm.engine.tokenizer.get_vocab())
    ok = inputs.process(EngineRequest("fits", prompt="z" * 100, params=SamplingParams(max_tokens=1)))
    assert len(ok.prompt_token_ids) < 128


@pytest.mark.parametrize(("request_kwargs", "field"), [
    ({"prompt_token_ids": [1] * 128}, "prompt"),
    ({"prompt_token_ids": [10**6]}, "prompt_token_ids"),
    ({"prompt": "a", "prompt_token_ids": [1]}, "prompt"),
    ({"prompt": "a", "params": SamplingParams(max_tokens=500)}, "max_tokens"),
    ({"chat": ChatInput([])}, "messages"),
], ids=["too-long", "vocab", "two-inputs", "max-tokens", "no-messages"])
def test_bad_inputs_name_the_field(llm: LLM, request_kwargs: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidRequestError) as err:
        llm.engine.input_processor.process(EngineRequest("bad", **request_kwargs))
    assert err.value.field == field, err.value.message


def test_a_published_snapshot_never_changes(llm: LLM) -> None:
    engine = llm.engine
    before = engine.snapshot
    frozen = (before.num_steps, before.generation_tokens, dict(before.tokens_by_adapter))
    llm.generate(["snapshot"], SamplingParams(max_tokens=4, ignore_eos=True), adapters="upper")
    after = engine.snapshot
    assert after is not before and after.num_steps > frozen[0] and after.tokens_by_adapter.get("upper", 0) >= 4
    assert (before.num_steps, before.generation_tokens, dict(before.tokens_by_adapter)) == frozen


def test_adapter_gauges_follow_operations_without_a_step(llm: LLM) -> None:
    engine = llm.engine
    registered = engine.snapshot.adapters_registered
    llm.load_adapter("gauge", DEMO_ADAPTERS["upper"])
    assert engine.snapshot.adapters_registered == registered + 1
    llm.unload_adapter("gauge")
    assert engine.snapshot.adapters_registered == registered
