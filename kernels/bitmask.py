"""Grammar bitmasks applied to logits: public API, torch reference and device dispatch.

A bitmask row holds one bit per token (bit ``j % 32`` of int32 word ``j // 32``; 1 = allowed), as
xgrammar fills it. On CUDA tensors the op is one Triton launch (``bitmask_triton``) whose
integer arguments are never specialised, so a batch of any size reuses one compiled kernel (a
recompile in the middle of serving costs more than a whole decode step); elsewhere the torch
reference runs (``backend="triton"`` forces the kernel, on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from .attention import Backend, use_triton


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | list[int], *,
                        vocab: int | None = None, backend: Backend = "auto") -> None:
    """In place, for each ``r`` in ``rows``: ``logits[r, j] = -inf`` where bit ``j`` of ``bitmask[r]``
    is 0, and for every ``j >= vocab`` (tokens past the mask are never allowed).

    logits: [R, V] float (any float dtype); bitmask: [>= max(rows) + 1, W] int32 on logits' device;
    rows: distinct row indices (a list, or an int tensor on logits' device). Other rows are untouched.
    vocab: how many token ids the mask speaks for (default and at most ``32 * W``): the bits of the
    last word past it are padding, whatever they hold (xgrammar leaves them as they were).
    """
    covered = 32 * bitmask.shape[1] if vocab is None else min(vocab, 32 * bitmask.shape[1])
    index = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.int32)
    index = index.to(logits.device, non_blocking=True)
    if index.numel() == 0:
        return
    if use_triton(logits, backend):
        from . import bitmask_triton

        bitmask_triton.apply_token_bitmask(logits, bitmask, index, covered)
        return
    apply_token_bitmask_torch(logits, bitmask, index, covered)


def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, index: torch.Tensor,
                              vocab: int) -> None:
    covered = min(logits.shape[1], vocab)
    index = index.long()
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[index].unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :covered]  # [Rc, covered]
    logits[index, covered:] = float("-inf")  # past the mask: never allowed
    logits[index, :covered] = logits[index, :covered].masked_fill(~allowed, float("-inf"))
