"""Triton twin of ``bitmask.apply_token_bitmask_torch``: one program per (constrained row, block of tokens)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


# every integer is a runtime value: one compiled kernel for any batch, vocabulary and stride
@triton.jit(do_not_specialize=["vocab", "covered", "s_logits", "s_mask"])
def _apply_bitmask_kernel(logits_ptr, mask_ptr, rows_ptr, vocab, covered, s_logits, s_mask, BLOCK: tl.constexpr):
    row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    word = cols // 32
    # ids at or past `covered` (the mask's vocabulary) read as 0: forbidden, padding bits included
    bits = tl.load(mask_ptr + row * s_mask + word, mask=cols < covered, other=0)
    forbidden = ((bits >> (cols % 32)) & 1) == 0
    tl.store(logits_ptr + row * s_logits + cols, float("-inf"), mask=(cols < vocab) & forbidden)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, index: torch.Tensor, covered: int) -> None:
    """``covered``: the ids the mask speaks for (at most 32 × its words); every id past it is forbidden."""
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1 and bitmask.dtype == torch.int32
    assert covered <= 32 * bitmask.shape[1]
    vocab = logits.shape[1]
    grid = (index.numel(), triton.cdiv(vocab, BLOCK))
    _apply_bitmask_kernel[grid](logits, bitmask, index, vocab, min(covered, vocab), logits.stride(0),
                                bitmask.stride(0), BLOCK=BLOCK, num_warps=8)
