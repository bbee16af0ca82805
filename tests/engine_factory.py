"""Tiny random-weight HF models on disk, HF references, and the engine leak check (nothing downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from tests.tokenizers_factory import byte_level_bpe

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.25)

ARCHS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, {"architectures": ["LlamaForCausalLM"]}),
    "mistral": (MistralConfig, {"architectures": ["MistralForCausalLM"], "sliding_window": None}),
    "qwen2": (Qwen2Config, {"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True}),
    "qwen3": (Qwen3Config, {"architectures": ["Qwen3ForCausalLM"], "head_dim": 32, "tie_word_embeddings": True}),
}


def write_tiny_model(out_dir: Path, arch: str = "qwen3", seed: int = 0, **overrides: Any) -> Path:
    """A float32 random model + the byte-level test tokenizer, saved with ``save_pretrained``."""
    tokenizer = byte_level_bpe()
    cls, extra = ARCHS[arch]
    cfg = cls(**{**SMALL, **extra, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": tokenizer.eos_token_id, "bos_token_id": None, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """HF transformers ``generate`` on one prompt alone, greedy; returns the new token ids."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id or 0)
    return out[0, len(prompt_ids):].tolist()


def load_hf(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_no_leaks(engine: Any) -> None:
    """Every KV block back in the pool, nothing queued or running, no adapter pinned by a request."""
    kv = engine.kv
    assert not engine.seqs, f"requests left: {list(engine.seqs)}"
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert kv.num_free_blocks == kv.num_blocks, f"{kv.num_used_blocks} KV blocks leaked"
    assert all(b.ref_count == 0 for b in kv.blocks)
    if engine.adapters is not None:
        assert all(info.running_requests == 0 for info in engine.adapters.list())
