"""Property tests: every constrained output of the engine satisfies its constraint (jsonschema /
re.fullmatch / choice), for the demo model with its adapters and for a random tiny model with a
random PEFT adapter, at temperature 0 and 1, in mixed batches with unconstrained rows, with
chunked prefill and preemption forced (a small token budget and a tiny KV cache)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex import LLM, SamplingParams
from loraplex.backend.demo import DEMO_MODEL_DIR, expected_output
from tests.engine_factory import assert_no_leaks, write_tiny_model
from tests.lora_factory import make_peft_adapter
from tests.structured.strategies import CHOICES, check_output, json_schemas, regexes

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(), reason="demo model not built")

MAX_TOKENS = 96
# chunked prefill (32-token steps) and preemption (36 blocks of 4 tokens for up to 7 requests of ~126)
SQUEEZED = {"max_num_batched_tokens": 32, "block_size": 4, "num_gpu_blocks_override": 36, "max_num_seqs": 8}
TEXTS = ["Hello world", "abc 123", "The cat sat"]
CONSTRAINTS = st.one_of(json_schemas().map(lambda s: ("json", s)), regexes().map(lambda r: ("regex", r)),
                        CHOICES.map(lambda c: ("choice", c)))


def _row(adapters: list[str | None]) -> Any:
    return st.tuples(CONSTRAINTS, st.sampled_from([0.0, 1.0]), st.sampled_from(adapters),
                     st.sampled_from(TEXTS), st.integers(0, 2**32))


def run_batch(llm: LLM, rows: list[Any], free_rows: list[tuple[str | None, str]]) -> list[Any]:
    """Constrained ``rows`` plus greedy unconstrained ``free_rows`` in one generate call."""
    prompts, params, adapters = [], [], []
    for (kind, value), temperature, adapter, text, seed in rows:
        prompts.append(_chat(llm, text))
        params.append(SamplingParams(temperature=temperature, seed=seed, max_tokens=MAX_TOKENS,
                                     structured_outputs={kind: value}))
        adapters.append(adapter)
    for adapter, text in free_rows:
        prompts.append(_chat(llm, text))
        params.append(SamplingParams(temperature=0.0, max_tokens=24))
        adapters.append(adapter)
    outs = llm.generate(prompts, params, adapters=adapters)
    for out, ((kind, value), *_rest) in zip(outs, rows, strict=False):
        assert out.finish_reason == "stop", (kind, value, out.text)
        check_output(kind, value, out.text)
    assert_no_leaks(llm.engine)
    return outs[len(rows):]


def _chat(llm: LLM, text: str) -> str:
    if not getattr(llm.tokenizer, "chat_template", None):
        return f"user: {text}, {text}, {text}\nassistant:"  # the random model has no template
    return llm.apply_chat_template([{"role": "user", "content": text}])


SETTINGS = settings(max_examples=8, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def test_demo_model_outputs_satisfy_their_constraints() -> None:
    llm = LLM(**SQUEEZED)
    demo_adapters = [None, "reverse", "upper", "tools"]
    examples: list[int] = []

    @SETTINGS
    @given(st.lists(_row(demo_adapters), min_size=3, max_size=5))
    def check(rows: list[Any]) -> None:
        examples.append(len(rows))
        free = run_batch(llm, rows, [("reverse", "Hello world"), (None, "abc 123")])
        # the grammar masks touch only their own rows
        assert [o.text for o in free] == [expected_output("reverse", "Hello world"), "abc 123"]

    check()
    print(f"{len(examples)} batches, {sum(examples)} constrained requests")
    assert len(examples) >= 8 and llm.engine.scheduler.num_preemptions > 0, "the test must force preemption"


def test_random_model_outputs_satisfy_their_constraints(tmp_path) -> None:
    base = write_tiny_model(tmp_path / "base", "qwen3")
    adapter = make_peft_adapter(base, tmp_path / "lora", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=3)
    llm = LLM(str(base), dtype="float32", max_lora_rank=8, adapter_roots=[str(tmp_path)], **SQUEEZED)
    llm.load_adapter("rnd", str(adapter))
    examples: list[int] = []

    @settings(SETTINGS, max_examples=20)  # a tiny model: more examples for the time
    @given(st.lists(_row([None, "rnd"]), min_size=3, max_size=5))
    def check(rows: list[Any]) -> None:
        examples.append(len(rows))
        run_batch(llm, rows, [("rnd", "abc 123")])

    check()
    print(f"{len(examples)} batches, {sum(examples)} constrained requests")
    assert len(examples) >= 8 and llm.engine.scheduler.num_preemptions > 0, "the test must force preemption"


def test_ids_past_the_tokenizer_are_never_sampled_under_a_grammar(tmp_path) -> None:
    """A model whose vocabulary is padded past the tokenizer's (Qwen's 151,936 rows for ~151,665
    tokens): xgrammar sets the mask's padding bits (the last word's, past the tokenizer) to 1
    inside strings, so they must be forbidden by the mask's width, not by its bits. With a zero LM
    head every token is equally likely at temperature 1, padded ids included."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.tokenizers_factory import byte_level_bpe

    spelled = len(byte_level_bpe())
    base = write_tiny_model(tmp_path / "base", "qwen3", vocab_size=spelled + 23, tie_word_embeddings=False)
    weights = load_file(base / "model.safetensors")
    weights["lm_head.weight"] = torch.zeros_like(weights["lm_head.weight"])
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    llm = LLM(str(base), dtype="float32", enable_lora=False)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=48, structured_outputs={"json": schema})
              for i in range(8)]
    outs = llm.generate(["user: a name\nassistant:"] * 8, params)
    for out in outs:
        assert out.finish_reason in ("stop", "length"), (out.finish_reason, out.text)
        assert max(out.token_ids) < spelled, out.token_ids
    assert sum(len(o.token_ids) for o in outs) > 100  # long strings: thousands of chances at a padded id
