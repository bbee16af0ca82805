"""The paged-attention layer: the attention prologue (per-head q/k norm, RoPE, the K/V cache
write) and attention over the paged cache.

It owns the layer's cache views and the kernel choice; model files hand it the fused
q/k/v projection (and that projection's LoRA expand, when it was left to the prologue). On CUDA the prologue is one Triton launch and attention reads the
cache in place; elsewhere both run as their torch twins. The step's metadata (block
tables, lengths) comes from the forward context that the runner sets.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.backend.layers.basic import RotaryEmbedding
from loraplex.backend.layers.context import get_context
from loraplex.kernels.attention import paged_attention, warm_up
from loraplex.kernels.fused import qk_norm_rope_write_kv
from loraplex.kernels.lora import LoRADelta


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rope: RotaryEmbedding,
                 sliding_window: int | None = None, norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.rope = rope
        self.sliding_window = sliding_window
        self.norm_eps = norm_eps
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, Hkv, D], set by the runner
        self.v_cache: torch.Tensor | None = None

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def warm_up(self) -> None:
        """Compiles the attention kernels this layer's steps launch (the runner calls it at start-up)."""
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not allocated"
        warm_up(self.num_heads, self.k_cache, self.v_cache, self.scale, self.sliding_window)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor,
                qk_norm: tuple[torch.Tensor, torch.Tensor] | None = None, delta: LoRADelta | None = None
                ) -> torch.Tensor:
        """qkv: [T, (H + 2 Hkv) * D]; qk_norm: per-head RMSNorm weights of q and k (Qwen3); delta: the
        qkv projection's LoRA expand, left to the prologue (``LoRALinear.forward_deferred``) -> [T, H * D]."""
        meta = get_context().attn
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not allocated"
        q_w, k_w = qk_norm if qk_norm is not None else (None, None)
        q = qk_norm_rope_write_kv(qkv, positions, self.rope.cos, self.rope.sin, self.k_cache, self.v_cache,
                                  meta.slot_mapping, self.num_heads, self.num_kv_heads, q_w, k_w, self.norm_eps,
                                  delta=delta)
        mask = None
        if self.k_cache.device.type != "cuda":  # the torch reference path shares one mask per step
            mask = meta.mask(self.sliding_window, self.k_cache.shape[1])
        out = paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, meta.query_lens,
                              meta.query_index, meta.max_query_len, self.scale, self.sliding_window, mask,
                              query_start_loc=meta.query_start_loc, tiles=meta.tiles)
        return out.reshape(out.shape[0], -1)
