"""The Llama family (Llama 2/3, Mistral), Qwen2 and Qwen3 as one decoder.

They differ only in switches read from the HF config: q/k/v bias (Qwen2),
per-head q/k RMSNorm (Qwen3), tied embeddings, head_dim, sliding window. The
model knows nothing of batching: ``forward(input_ids, positions)`` over a flat
batch of tokens; attention and LoRA metadata arrive through the forward context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from loraplex.backend.layers.basic import RMSNorm, RotaryEmbedding, build_rope, silu_and_mul
from loraplex.backend.layers.context import get_context
from loraplex.backend.layers.lora import LoRALinear
from loraplex.kernels.attention import paged_attention, write_kv


@dataclass(frozen=True)
class ArchSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    attention_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_window: int | None

    @classmethod
    def from_hf(cls, cfg: Any, qk_norm: bool, qkv_bias_default: bool) -> ArchSpec:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        window = getattr(cfg, "sliding_window", None)
        if getattr(cfg, "use_sliding_window", True) is False:
            window = None
        return cls(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim, rms_norm_eps=cfg.rms_norm_eps, max_positions=cfg.max_position_embeddings,
            attention_bias=bool(getattr(cfg, "attention_bias", qkv_bias_default)), qk_norm=qk_norm,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), sliding_window=window)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-able projection."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


class Attention(nn.Module):
    def __init__(self, spec: ArchSpec, rope: RotaryEmbedding, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = LoRALinear(spec.hidden_size, (q_size, kv_size, kv_size), bias=spec.attention_bias)
        self.o_proj = LoRALinear(q_size, (spec.hidden_size,))
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.rope = rope
        self.scale = spec.head_dim ** -0.5
        self.sliding_window = spec.sliding_window
        self.layer_idx = layer_idx
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, Hkv, D], set by the runner
        self.v_cache: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.out_slices, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(positions, q, k)
        meta = get_context().attn
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not allocated"
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        mask = meta.mask(self.sliding_window, self.k_cache.shape[1])
        out = paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, meta.query_lens,
                              meta.query_index, meta.max_query_len, self.scale, self.sliding_window, mask)
        return self.o_proj(out.reshape(out.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.gate_up_proj = LoRALinear(spec.hidden_size, (spec.intermediate_size, spec.intermediate_size))
        self.down_proj = LoRALinear(spec.intermediate_size, (spec.hidden_size,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ArchSpec, rope: RotaryEmbedding, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(spec, rope, layer_idx)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(positions, self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(self, spec: ArchSpec, hf_config: Any):
        super().__init__()
        self.spec = spec
        rope = build_rope(hf_config, spec.head_dim, spec.max_positions)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, rope, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = rope

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def lora_linears(self) -> list[tuple[int, str, tuple[str, ...], LoRALinear]]:
        """(layer, group, modules, layer object) of every LoRA-able linear."""
        out = []
        for i, layer in enumerate(cast("list[DecoderLayer]", self.layers)):
            attn, mlp = layer.self_attn, layer.mlp
            out += [(i, "qkv_proj", ("q_proj", "k_proj", "v_proj"), attn.qkv_proj),
                    (i, "o_proj", ("o_proj",), attn.o_proj),
                    (i, "gate_up_proj", ("gate_proj", "up_proj"), mlp.gate_up_proj),
                    (i, "down_proj", ("down_proj",), mlp.down_proj)]
        return out


# HF parameter name (suffix after "model.layers.N.") -> (our name, slice index within the fused weight)
FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
