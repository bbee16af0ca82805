"""Fused small ops of the decoder layer (torch twins; the Triton versions arrive on branch h/kern)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "triton", "torch"]


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None, *,
             backend: Backend = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """w * (x / rms(x)); with ``residual``: r = x + residual, returns (rms_norm(r), r)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (out, x) if residual is not None else out


def silu_and_mul(x: Tensor, *, backend: Backend = "auto") -> Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *,
                     backend: Backend = "auto") -> None:
    """In place: q, k [T, H, D] rotated (rotate-half) by cos/sin [max_pos, D] at ``positions`` [T]."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    for x in (q, k):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        x.copy_(xf * c + torch.cat((-x2, x1), dim=-1) * s)
