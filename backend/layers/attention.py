"""The paged-attention layer: writes this step's K/V into the cache and attends over it.

It owns the layer's cache views and the kernel choice; model files only call
``attn(q, k, v)``. The step's metadata (block tables, lengths) comes from the
forward context that the runner sets.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.backend.layers.context import get_context
from loraplex.kernels.attention import paged_attention, write_kv


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, Hkv, D], set by the runner
        self.v_cache: torch.Tensor | None = None

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> [T, H * D]."""
        meta = get_context().attn
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not allocated"
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        mask = None
        if self.k_cache.device.type != "cuda":  # the torch reference path shares one mask per step
            mask = meta.mask(self.sliding_window, self.k_cache.shape[1])
        out = paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, meta.query_lens,
                              meta.query_index, meta.max_query_len, self.scale, self.sliding_window, mask,
                              query_start_loc=meta.query_start_loc)
        return out.reshape(out.shape[0], -1)
