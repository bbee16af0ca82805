"""Per-step metadata that layers read: attention over the paged cache and LoRA rows.

The model files know nothing of batching; the runner sets this context around
each forward (nano-vllm style).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from loraplex.kernels.attention import causal_mask
from loraplex.kernels.lora import LoRABatchMeta


@dataclass
class AttentionMeta:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64
    seq_lens: torch.Tensor  # [B] int64: context length after this step
    query_lens: torch.Tensor  # [B] int64: new tokens this step
    query_index: torch.Tensor  # [T] int64: b * max_query_len + i (the torch reference path's padding)
    query_start_loc: torch.Tensor  # [B+1] int32: sequence b's tokens are rows [loc[b], loc[b+1])
    max_query_len: int
    tiles: torch.Tensor | None = None  # [NT, 2] int32 tile map of a captured mixed step (Triton path)
    masks: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)  # shared by the layers

    def mask(self, sliding_window: int | None, block_size: int) -> torch.Tensor:
        """[B, max_query_len, max_kv] causal mask, built once per step (per window) and reused by every layer."""
        key = (sliding_window, block_size)
        if key not in self.masks:
            max_kv = self.block_tables.shape[1] * block_size
            self.masks[key] = causal_mask(self.seq_lens, self.query_lens, self.max_query_len, max_kv, sliding_window)
        return self.masks[key]


@dataclass
class ForwardContext:
    attn: AttentionMeta
    lora: LoRABatchMeta | None = None  # None when no row uses an adapter


_CONTEXT: ForwardContext | None = None


def get_context() -> ForwardContext:
    assert _CONTEXT is not None, "forward called outside of a forward context"
    return _CONTEXT


@contextmanager
def forward_context(ctx: ForwardContext):  # type: ignore[no-untyped-def]
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = previous
