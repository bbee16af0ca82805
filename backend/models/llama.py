"""The Llama family (Llama 2/3, Mistral), Qwen2 and Qwen3 as one decoder.

They differ only in switches read from the HF config: q/k/v bias (Qwen2),
per-head q/k RMSNorm (Qwen3), tied embeddings, head_dim, sliding window. The
model knows nothing of batching: ``forward(input_ids, positions)`` over a flat
batch of tokens; attention and LoRA metadata arrive through the forward context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex.backend.layers.attention import PagedAttention
from loraplex.backend.layers.basic import Linear, RMSNorm, RotaryEmbedding, build_rope, silu_and_mul
from loraplex.backend.layers.lora import LoRALinear
from loraplex.kernels.lora import LoRADelta, LoRAShrink
from loraplex.lora.peft import projection_shapes
from loraplex.lora.types import PACKED_MODULES


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
        return projection_shapes(self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim,
                                 self.num_kv_heads * self.head_dim)


class Attention(nn.Module):
    def __init__(self, spec: ArchSpec, rope: RotaryEmbedding):
        super().__init__()
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = LoRALinear(spec.hidden_size, (q_size, kv_size, kv_size), bias=spec.attention_bias)
        self.o_proj = LoRALinear(q_size, (spec.hidden_size,))
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.attn = PagedAttention(spec.num_heads, spec.num_kv_heads, spec.head_dim, rope, spec.sliding_window,
                                   spec.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, shrunk: LoRAShrink | None = None
                ) -> tuple[torch.Tensor, LoRADelta | None]:
        """shrunk: qkv_proj's LoRA shrink of x, made by the norm that made x (or None) -> (o_proj's
        output, its LoRA expand left to the next norm, or None)."""
        qk_norm = None
        if self.q_norm is not None and self.k_norm is not None:
            qk_norm = (self.q_norm.weight, self.k_norm.weight)
        qkv, delta = self.qkv_proj.forward_deferred(x, shrunk)  # the expand runs in the attention prologue
        return self.o_proj.forward_deferred(self.attn(positions, qkv, qk_norm, delta))


class MLP(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.gate_up_proj = LoRALinear(spec.hidden_size, (spec.intermediate_size, spec.intermediate_size))
        self.down_proj = LoRALinear(spec.intermediate_size, (spec.hidden_size,))

    def forward(self, x: torch.Tensor, shrunk: LoRAShrink | None = None) -> tuple[torch.Tensor, LoRADelta | None]:
        """shrunk: gate_up's LoRA shrink of x, made by the norm that made x (or None) -> (down_proj's
        output, its LoRA expand left to the next norm, or None); gate_up's expand runs inside SiLU-and-mul,
        and so does down's shrink."""
        down_shrink = self.down_proj.early_shrink()
        act = silu_and_mul(*self.gate_up_proj.forward_deferred(x, shrunk), shrink=down_shrink)
        return self.down_proj.forward_deferred(act, down_shrink)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ArchSpec, rope: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(spec, rope)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
                delta: LoRADelta | None = None) -> tuple[torch.Tensor, torch.Tensor, LoRADelta | None]:
        """h: this layer's input less ``residual`` (None at the first layer) and ``delta`` (the previous
        layer's pending LoRA expand) -> (mlp output, residual, this layer's pending expand)."""
        qkv_shrink = self.self_attn.qkv_proj.early_shrink()  # the norms also shrink for the projections
        if residual is None:
            h, residual = self.input_layernorm(h, qkv_shrink), h
        else:
            h, residual = self.input_layernorm.add_norm(h, residual, delta, qkv_shrink)
        h, delta = self.self_attn(positions, h, qkv_shrink)
        gate_up_shrink = self.mlp.gate_up_proj.early_shrink()
        h, residual = self.post_attention_layernorm.add_norm(h, residual, delta, gate_up_shrink)
        h, delta = self.mlp(h, gate_up_shrink)
        return h, residual, delta


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(self, spec: ArchSpec, hf_config: Any):
        super().__init__()
        self.spec = spec
        rope = build_rope(hf_config, spec.head_dim, spec.max_positions)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, rope) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = rope

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        h, residual, delta = self.embed_tokens(input_ids), None, None
        for layer in self.layers:
            h, residual, delta = layer(positions, h, residual, delta)
        assert residual is not None
        return self.norm.add_norm(h, residual, delta)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def lora_linears(self) -> list[tuple[int, str, tuple[str, ...], LoRALinear]]:
        """(layer, group, modules, layer object) of every LoRA-able linear."""
        return [(i, group, modules, getattr(getattr(layer, block), group))
                for i, layer in enumerate(self.layers) for group, (block, modules) in PACKED_MODULES.items()]


# HF parameter name (suffix after "model.layers.N.") -> (our name, slice index within the fused weight)
FUSED = {f"{block}.{module}": (f"{block}.{group}", i) for group, (block, modules) in PACKED_MODULES.items()
         if len(modules) > 1 for i, module in enumerate(modules)}
