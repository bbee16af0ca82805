"""Random-weight models of real shapes, with random-weight PEFT LoRA adapters, written to disk for ``loraplex serve``.

No hub access: a word-level tokenizer of ``<i>`` tokens covers the vocabulary, so random token-id
prompts are valid and every id detokenizes to text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

from bench.engine_throughput import QWEN3_06B, TARGETS

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512)
TINY_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512)
SHAPES: dict[str, tuple[str, dict]] = {
    "llama2-7b": ("llama", LLAMA2_7B), "qwen3-0.6b": ("qwen3", QWEN3_06B),
    "tiny-llama": ("llama", TINY_LLAMA), "tiny-qwen3": ("qwen3", TINY_QWEN3),
}


def model_config(arch: str, shape: dict) -> PretrainedConfig:
    if arch == "llama":
        return LlamaConfig(**shape, max_position_embeddings=4096, architectures=["LlamaForCausalLM"],
                           bos_token_id=1, eos_token_id=2)
    return Qwen3Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                       architectures=["Qwen3ForCausalLM"], eos_token_id=0)


def write_model(root: Path, shape_name: str, device: str, n_adapters: int, rank: int = 16) -> tuple[Path, list[Path]]:
    """``root/model`` (bf16 safetensors + tokenizer) and ``root/a0..`` (rank-``rank`` adapters on all 7 projections)."""
    from peft import LoraConfig, get_peft_model

    arch, shape = SHAPES[shape_name]
    cfg = model_config(arch, shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(root / "model")
    eos = cfg.eos_token_id
    vocab = {f"<{i}>": i for i in range(shape["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=f"<{eos}>")),
                                  eos_token=f"<{eos}>")
    tok.save_pretrained(root / "model")
    adapters = []
    for i in range(n_adapters):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                      init_lora_weights=False))
        peft_model.save_pretrained(str(root / f"a{i}"))
        adapters.append(root / f"a{i}")
        model = peft_model.unload()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return root / "model", adapters
