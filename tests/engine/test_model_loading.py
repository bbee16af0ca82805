"""Model loading: sharded checkpoints, rope scaling, sliding window, unsupported architectures."""

from __future__ import annotations

import json

import pytest

from loraplex import LLM, SamplingParams
from loraplex.errors import ConfigError, UnsupportedModelError
from tests.engine_factory import hf_greedy, load_hf, write_tiny_model

PROMPTS = [[5, 9, 17, 33, 2, 8, 90, 4] * 3, [40, 41]]


def _check_against_hf(path, **engine):
    hf = load_hf(path)
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=2**26, enable_lora=False, **engine)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10))
    for out, prompt in zip(outs, PROMPTS, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 10, hf.config.eos_token_id)


@pytest.mark.parametrize(("arch", "overrides"), [
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}}),
    ("mistral", {"sliding_window": 8}),
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
])
def test_model_variants_match_hf(tmp_path, arch, overrides):
    _check_against_hf(write_tiny_model(tmp_path, arch, **overrides))


def test_sharded_checkpoint(tmp_path):
    path = write_tiny_model(tmp_path / "m", "qwen3")
    hf = load_hf(path)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((path / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    _check_against_hf(sharded)


def test_unsupported_architecture_lists_supported(tmp_path):
    path = write_tiny_model(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as err:
        LLM(str(path))
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(err.value)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
