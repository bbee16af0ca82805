"""Fused small ops of a decoder layer: public API, torch twins and device dispatch.

Each op is one Triton launch on CUDA tensors (``fused_triton``) and its torch twin elsewhere
(``backend="triton"`` forces the kernel, on CPU under ``TRITON_INTERPRET=1``). The twins are
exactly the model's layers in backend/layers/basic.py (RMSNorm, silu_and_mul, RotaryEmbedding),
so the Triton path rounds where they round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .attention import Backend, use_triton, write_kv

if TYPE_CHECKING:
    from .lora import LoRADelta, LoRAShrink


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             backend: Backend = "auto", delta: LoRADelta | None = None, shrink: LoRAShrink | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, optionally after the residual add, in one kernel.

    x, residual: [T, N]; weight: [N]; delta: a LoRA expand of the layer that made x, not yet applied
    (``LoRALinear.forward_deferred``; one output slice), applied first as that expand would; shrink:
    the LoRA shrink of the layer that reads y (``LoRALinear.early_shrink``), computed from y and left
    in ``shrink.h``.
    if delta is not None: x = x + delta                               (the expand, in x.dtype)
    if residual is not None: x = x + residual                         (in x.dtype; returned as r)
    y = weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(x.dtype)
    if shrink is not None: shrink.h = bgmv_shrink(y, shrink.lora_a, shrink.token_slots)
    returns y, or (y, r) with a residual.
    """
    if use_triton(x, backend):
        from . import fused_triton

        return fused_triton.rms_norm(x, weight, eps, residual, delta, shrink)
    return rms_norm_torch(x, weight, eps, residual, delta, shrink)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                   delta: LoRADelta | None = None, shrink: LoRAShrink | None = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if delta is not None:
        x = delta.applied(x)
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    if shrink is not None:
        shrink.run(y, backend="torch")
    return y if residual is None else (y, x)


def silu_and_mul(x: torch.Tensor, *, backend: Backend = "auto", delta: LoRADelta | None = None,
                 shrink: LoRAShrink | None = None) -> torch.Tensor:
    """x [T, 2I] -> y = silu(x[:, :I]) * x[:, I:]  [T, I] (silu rounded to x.dtype before the product).
    delta: the pending LoRA expand of the gate/up projection (two slices of I), applied to x first;
    shrink: the down projection's LoRA shrink, computed from y (``shrink.h``, as in rms_norm)."""
    if use_triton(x, backend):
        from . import fused_triton

        return fused_triton.silu_and_mul(x, delta, shrink)
    return silu_and_mul_torch(x, delta, shrink)


def silu_and_mul_torch(x: torch.Tensor, delta: LoRADelta | None = None,
                       shrink: LoRAShrink | None = None) -> torch.Tensor:
    if delta is not None:
        x = delta.applied(x)
    gate, up = x.chunk(2, dim=-1)
    y = F.silu(gate) * up
    if shrink is not None:
        shrink.run(y, backend="torch")
    return y


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, *, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (neox) RoPE of q and k in place; returns (q, k).

    positions: [T]; q: [T, H, D], k: [T, Hkv, D] (strided views of a fused qkv are fine; last dim
    contiguous); cos, sin: [max_pos, D] float32 tables as RotaryEmbedding builds them.
    x1, x2 = x.float().chunk(2, -1)
    x[:] = (x.float() * cos[positions] + cat(-x2, x1) * sin[positions]).to(x.dtype)   for x in (q, k)
    """
    if use_triton(q, backend):
        from . import fused_triton

        fused_triton.rotary_embedding(positions, q, k, cos, sin)
        return q, k
    return rotary_embedding_torch(positions, q, k, cos, sin)


def rotary_embedding_torch(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    for x in (q, k):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        x.copy_((xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype))
    return q, k


def qk_norm_rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          num_heads: int, num_kv_heads: int, q_norm_weight: torch.Tensor | None = None,
                          k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6, *,
                          backend: Backend = "auto", delta: LoRADelta | None = None) -> torch.Tensor:
    """The attention prologue in one launch: split the fused projection, per-head q/k RMSNorm (Qwen3;
    skipped when the weights are None), RoPE, K/V into the cache; returns q [T, H, D] (a new tensor).

    qkv: [T, (H + 2*Hkv) * D]; k/v_cache: [N, BS, Hkv, D]; slot_mapping: [T] (< 0: no write); delta:
    the qkv projection's pending LoRA expand (three slices), applied first as that expand would.
    if delta is not None: qkv = qkv + delta                         (the expand, in qkv.dtype)
    q, k, v = qkv.split([H*D, Hkv*D, Hkv*D], -1)       (viewed as [T, heads, D])
    if q_norm_weight is not None: q, k = rms_norm(q, q_norm_weight, eps), rms_norm(k, k_norm_weight, eps)
    q, k = rotary_embedding(positions, q, k, cos, sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping);  return q
    """
    if use_triton(qkv, backend):
        from . import fused_triton

        return fused_triton.qk_norm_rope_write_kv(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping,
                                                  num_heads, num_kv_heads, q_norm_weight, k_norm_weight, eps,
                                                  delta)
    if delta is not None:
        qkv = delta.applied(qkv)
    head_dim = k_cache.shape[-1]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(-1, num_heads, head_dim)
    k = k.reshape(-1, num_kv_heads, head_dim)
    v = v.reshape(-1, num_kv_heads, head_dim)
    if q_norm_weight is not None and k_norm_weight is not None:
        q, k = rms_norm_torch(q, q_norm_weight, eps), rms_norm_torch(k, k_norm_weight, eps)
    q, k = rotary_embedding_torch(positions, q.clone(), k.clone(), cos, sin)  # type: ignore[arg-type]
    write_kv(k, v, k_cache, v_cache, slot_mapping, backend="torch")
    return q
