"""Random-weight models of real shapes, with random-weight PEFT LoRA adapters, written to disk for ``loraplex serve``.

No hub access: a word-level tokenizer of ``<i>`` tokens covers the vocabulary, so random token-id
prompts are valid and every id detokenizes to text.
"""

from __future__ import annotations

from pathlib import Path

from bench import engine_throughput
from bench.engine_throughput import QWEN3_06B

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


def write_model(root: Path, shape_name: str, device: str, n_adapters: int, rank: int = 16) -> tuple[Path, list[Path]]:
    """``root/model`` (bf16 safetensors + tokenizer) and ``root/a0..`` (rank-``rank`` adapters on all 7 projections)."""
    arch, shape = SHAPES[shape_name]
    return engine_throughput.write_model(root, shape, device, n_adapters, arch, rank)
