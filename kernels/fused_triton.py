"""Triton twins of the fused small ops in ``fused`` (RMSNorm + residual, SiLU-and-mul, RoPE).

Each rounds to the storage dtype exactly where the torch twin does, so float32 results match
the twins up to reduction order (RMSNorm) or bit for bit (RoPE, SiLU-and-mul without FMA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from .lora import LoRADelta


@triton.jit
def _lora_delta(x, row, cols, mask, h_off, col_off, h_ptr, b_ptr, sc_ptr, slots_ptr, P, R,
                s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R: tl.constexpr):
    """x + the pending BGMV expand of token ``row`` on columns ``col_off + cols`` (its slice's h at
    ``h_off``): scales[s] * sum_r B[s, col, r] * h[r], h summed over its P partials; the expand
    kernel's arithmetic and rounding (lora_triton._bgmv_expand_kernel)."""
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot >= 0:
        rs = tl.arange(0, BLOCK_R)
        r_ok = rs < R
        h_ptrs = h_ptr + row * s_ht + (h_off + rs) * s_hn
        h = tl.load(h_ptrs, mask=r_ok, other=0.0)
        for p in range(1, P):
            h += tl.load(h_ptrs + p * s_hp, mask=r_ok, other=0.0)
        w = tl.load(b_ptr + slot * s_bs + (col_off + cols)[:, None] * s_bo + rs[None, :] * s_br,
                    mask=mask[:, None] & r_ok[None, :], other=0.0)
        d = tl.sum(w.to(tl.float32) * h[None, :], axis=1) * tl.load(sc_ptr + slot)
        x = (x.to(tl.float32) + d).to(x.dtype)
    return x


# P (the shrink's partial sums) and the partials' stride follow the step's token count: runtime values,
# never specialised (a value of 1 or a multiple of 16 would compile another variant mid-serving).
@triton.jit(do_not_specialize=["P", "s_hp"])
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, r_ptr, s_x, s_res, s_y, s_r, N, eps,
                     h_ptr, b_ptr, sc_ptr, slots_ptr, P, R, s_hp, s_ht, s_hn, s_bs, s_bo, s_br,
                     HAS_RES: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        x = _lora_delta(x, row, cols, mask, 0, 0, h_ptr, b_ptr, sc_ptr, slots_ptr, P, R,
                        s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R)
    if HAS_RES:
        res = tl.load(res_ptr + row * s_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + row * s_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, 0) / N + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * s_y + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _delta_args(delta: LoRADelta | None, fallback: torch.Tensor) -> tuple:
    """The pending expand's pointers, counts and strides (h as [P, T, N]); placeholders without one."""
    if delta is None:
        return (fallback,) * 4 + (1, 1) + (0,) * 6
    h = delta.h if delta.h.dim() == 3 else delta.h.unsqueeze(0)
    return (h, delta.lora_b, delta.scales, delta.token_slots, h.shape[0], delta.lora_b.shape[2],
            *h.stride(), *delta.lora_b.stride())


def _block_r(delta: LoRADelta | None) -> int:
    return 1 if delta is None else max(4, triton.next_power_of_2(delta.lora_b.shape[2]))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             delta: LoRADelta | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = _rows(x)
    r_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, r_dtype), device=x.device)
    res2 = _rows(residual) if residual is not None else x2
    r = torch.empty(x2.shape, dtype=r_dtype, device=x.device) if residual is not None else y
    block = triton.next_power_of_2(n)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight, y, r, x2.stride(0), res2.stride(0), y.stride(0), r.stride(0), n, eps,
            *_delta_args(delta, x2),
            HAS_RES=residual is not None, HAS_DELTA=delta is not None, BLOCK=block, BLOCK_R=_block_r(delta),
            num_warps=min(16, max(1, block // 256)),
        )
    y = y.view(*x.shape[:-1], n)
    return y if residual is None else (y, r.view(*x.shape[:-1], n))


@triton.jit(do_not_specialize=["P", "s_hp"])
def _silu_and_mul_kernel(x_ptr, y_ptr, s_x, s_y, INTER,
                         h_ptr, b_ptr, sc_ptr, slots_ptr, P, R, s_hp, s_ht, s_hn, s_bs, s_bo, s_br,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * s_x + INTER + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # slice 0 (gate) is h[:R] through B's first INTER rows, slice 1 (up) h[R:2R] the rest
        gate = _lora_delta(gate, row, cols, mask, 0, 0, h_ptr, b_ptr, sc_ptr, slots_ptr, P, R,
                           s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R)
        up = _lora_delta(up, row, cols, mask, R, INTER, h_ptr, b_ptr, sc_ptr, slots_ptr, P, R,
                         s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R)
    gf = gate.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(gate.dtype)
    tl.store(y_ptr + row * s_y + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, delta: LoRADelta | None = None) -> torch.Tensor:
    inter = x.shape[-1] // 2
    x2 = _rows(x)
    y = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, y, x2.stride(0), y.stride(0), inter, *_delta_args(delta, x2),
            HAS_DELTA=delta is not None, BLOCK=block, BLOCK_R=_block_r(delta), num_warps=4,
        )
    return y.view(*x.shape[:-1], inter)


@triton.jit
def _rotate_heads(x_ptr, t, s_t, s_h, c1, c2, s1, s2, HEADS: tl.constexpr, H_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < HEADS) & (d < HALF)
    ptr = x_ptr + t * s_t + h * s_h + d
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    tl.store(ptr, (f1 * c1 + (-f2) * s1).to(x1.dtype), mask=mask)
    tl.store(ptr + HALF, (f2 * c2 + f1 * s2).to(x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, s_qt, s_qh, s_kt, s_kh, s_cos, s_sin,
                 H: tl.constexpr, HKV: tl.constexpr, H_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)[None, :]
    dm = d < HALF
    c1 = tl.load(cos_ptr + p * s_cos + d, mask=dm, other=0.0)
    c2 = tl.load(cos_ptr + p * s_cos + HALF + d, mask=dm, other=0.0)
    s1 = tl.load(sin_ptr + p * s_sin + d, mask=dm, other=0.0)
    s2 = tl.load(sin_ptr + p * s_sin + HALF + d, mask=dm, other=0.0)
    _rotate_heads(q_ptr, t, s_qt, s_qh, c1, c2, s1, s2, H, H_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr, t, s_kt, s_kh, c1, c2, s1, s2, HKV, HKV_PAD, HALF, HALF_PAD)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> None:
    num_tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary_embedding needs q, k, cos and sin contiguous in their last dim")
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        positions, q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        sin.stride(0), H=heads, HKV=kv_heads, H_PAD=triton.next_power_of_2(heads),
        HKV_PAD=triton.next_power_of_2(kv_heads), HALF=half, HALF_PAD=triton.next_power_of_2(half),
        num_warps=4, enable_fp_fusion=False,  # no FMA: the same roundings as the torch twin
    )


@triton.jit
def _norm_rope_heads(src_ptr, dst_ptr, s_dst_h, w_ptr, eps, c1, c2, s1, s2, dst_slot,
                     HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                     HAS_NORM: tl.constexpr):
    """Heads [HEADS, 2*HALF] at src (contiguous heads): optional per-head RMSNorm, RoPE, store at dst."""
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < HEADS) & (d < HALF)
    x1 = tl.load(src_ptr + h * (2 * HALF) + d, mask=mask, other=0.0)
    x2 = tl.load(src_ptr + h * (2 * HALF) + HALF + d, mask=mask, other=0.0)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    if HAS_NORM:  # rounded to x's dtype, then times the weight, as RMSNorm does
        rstd = 1.0 / tl.sqrt_rn((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0)
        w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0)
        f1 = (w1.to(tl.float32) * (f1 * rstd[:, None]).to(x1.dtype).to(tl.float32)).to(x1.dtype).to(tl.float32)
        f2 = (w2.to(tl.float32) * (f2 * rstd[:, None]).to(x1.dtype).to(tl.float32)).to(x1.dtype).to(tl.float32)
    ptr = dst_ptr + h * s_dst_h + d
    mask = mask & ((tl.zeros([H_PAD, HALF_PAD], tl.int64) + dst_slot) >= 0)  # dst_slot < 0: no store
    tl.store(ptr, (f1 * c1 + (-f2) * s1).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (f2 * c2 + f1 * s2).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kv_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, kc_ptr, vc_ptr, slots_ptr,
                            s_qkv, s_q, s_cos, s_sin, s_cn, s_cb, s_ch, s_dn, s_db, s_dh, eps,
                            H: tl.constexpr, HKV: tl.constexpr, H_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
                            HALF: tl.constexpr, HALF_PAD: tl.constexpr, BS: tl.constexpr, HAS_NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)[None, :]
    dm = d < HALF
    c1 = tl.load(cos_ptr + p * s_cos + d, mask=dm, other=0.0)
    c2 = tl.load(cos_ptr + p * s_cos + HALF + d, mask=dm, other=0.0)
    s1 = tl.load(sin_ptr + p * s_sin + d, mask=dm, other=0.0)
    s2 = tl.load(sin_ptr + p * s_sin + HALF + d, mask=dm, other=0.0)
    row = qkv_ptr + t * s_qkv
    _norm_rope_heads(row, q_ptr + t * s_q, 2 * HALF, qw_ptr, eps, c1, c2, s1, s2, t,
                     H, H_PAD, HALF, HALF_PAD, HAS_NORM)
    blk = tl.maximum(slot, 0) // BS
    off = tl.maximum(slot, 0) % BS
    _norm_rope_heads(row + H * 2 * HALF, kc_ptr + blk * s_cn + off * s_cb, s_ch, kw_ptr, eps, c1, c2, s1, s2,
                     slot, HKV, HKV_PAD, HALF, HALF_PAD, HAS_NORM)
    h = tl.arange(0, HKV_PAD)[:, None]
    dv = tl.arange(0, 2 * HALF_PAD)[None, :]
    vmask = (h < HKV) & (dv < 2 * HALF) & ((tl.zeros([HKV_PAD, 2 * HALF_PAD], tl.int64) + slot) >= 0)
    v = tl.load(row + (H + HKV) * 2 * HALF + h * (2 * HALF) + dv, mask=vmask)
    tl.store(vc_ptr + blk * s_dn + off * s_db + h * s_dh + dv, v.to(vc_ptr.dtype.element_ty), mask=vmask)


def qk_norm_rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          num_heads: int, num_kv_heads: int, q_norm_weight: torch.Tensor | None,
                          k_norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    num_tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    has_norm = q_norm_weight is not None and k_norm_weight is not None
    q_dtype = torch.promote_types(qkv.dtype, q_norm_weight.dtype) if q_norm_weight is not None else qkv.dtype
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=q_dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    half = head_dim // 2
    _qk_norm_rope_kv_kernel[(num_tokens,)](
        qkv, positions, cos, sin, q_norm_weight if has_norm else cos, k_norm_weight if has_norm else cos,
        q, k_cache, v_cache, slot_mapping, qkv.stride(0), q.stride(0), cos.stride(0), sin.stride(0),
        *k_cache.stride()[:3], *v_cache.stride()[:3], eps,
        H=num_heads, HKV=num_kv_heads, H_PAD=triton.next_power_of_2(num_heads),
        HKV_PAD=triton.next_power_of_2(num_kv_heads), HALF=half, HALF_PAD=triton.next_power_of_2(half),
        BS=k_cache.shape[1], HAS_NORM=has_norm, num_warps=4, enable_fp_fusion=False,
    )
    return q
