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
    from .lora import LoRADelta, LoRAShrink


@triton.jit
def _lora_delta(x, row, cols, mask, h_off, col_off, h_ptr, b_ptr, sc_ptr, slots_ptr, P, R,
                s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """x + the pending BGMV expand of token ``row`` on columns ``col_off + cols`` (its slice's h at
    ``h_off``): scales[s] * sum_r B[s, col, r] * h[r], h summed over its P <= BLOCK_P partials (one
    load for all of them, no chain of dependent loads); the expand kernel's arithmetic and rounding
    (lora_triton._bgmv_expand_kernel). x, cols and mask: one shape, 1-D or 2-D (the rank is a new
    last axis)."""
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot >= 0:
        rs = tl.arange(0, BLOCK_R)
        r_ok = rs < R
        ps = tl.arange(0, BLOCK_P)
        h = tl.sum(tl.load(h_ptr + row * s_ht + ps[:, None] * s_hp + (h_off + rs)[None, :] * s_hn,
                           mask=(ps < P)[:, None] & r_ok[None, :], other=0.0), axis=0)
        w = tl.load(b_ptr + slot * s_bs + tl.expand_dims(col_off + cols, -1) * s_bo + rs * s_br,
                    mask=tl.expand_dims(mask, -1) & r_ok, other=0.0)
        d = tl.sum(w.to(tl.float32) * h, axis=-1) * tl.load(sc_ptr + slot)
        x = (x.to(tl.float32) + d).to(x.dtype)
    return x


@triton.jit
def _lora_shrink(v, row, cols, mask, out_ptr, a_ptr, slots_ptr, s_as, s_an, s_ah, s_on,
                 NS: tl.constexpr, BLOCK_NS: tl.constexpr):
    """out[n] = sum over ``cols`` of A[s, n, col] * v[col] for n < NS, token ``row`` of slot s >= 0 (no
    store for base rows): the BGMV shrink's arithmetic over the producer's stored values (v, float32),
    BLOCK_NS rows of A at a time."""
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot >= 0:
        ns = tl.arange(0, BLOCK_NS)
        for n0 in tl.static_range(0, NS, BLOCK_NS):
            n_ok = (n0 + ns) < NS
            a = tl.load(a_ptr + slot * s_as + (n0 + ns)[:, None] * s_an + cols[None, :] * s_ah,
                        mask=n_ok[:, None] & mask[None, :], other=0.0)
            tl.store(out_ptr + (n0 + ns) * s_on, tl.sum(a.to(tl.float32) * v[None, :], axis=1), mask=n_ok)


# P (the shrink's partial sums) and the partials' stride follow the step's token count: runtime values,
# never specialised (a value of 1 or a multiple of 16 would compile another variant mid-serving); so is
# the early shrink's output row stride.
@triton.jit(do_not_specialize=["P", "s_hp", "s_gt", "s_gp"])
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, r_ptr, s_x, s_res, s_y, s_r, N, eps,
                     h_ptr, b_ptr, sc_ptr, slots_ptr, P, R, s_hp, s_ht, s_hn, s_bs, s_bo, s_br,
                     g_ptr, a_ptr, gsl_ptr, s_gt, s_gn, s_as, s_an, s_ah, s_gp,
                     HAS_RES: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_P: tl.constexpr,
                     NS: tl.constexpr, BLOCK_NS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        x = _lora_delta(x, row, cols, mask, 0, 0, h_ptr, b_ptr, sc_ptr, slots_ptr, P, R,
                        s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R, BLOCK_P)
    if HAS_RES:
        res = tl.load(res_ptr + row * s_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + row * s_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, 0) / N + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (w * normed).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * s_y + cols, y, mask=mask)
    if NS > 0:  # the early shrink of the layer that reads y
        _lora_shrink(y.to(tl.float32), row, cols, mask, g_ptr + row * s_gt, a_ptr, gsl_ptr, s_as, s_an, s_ah, s_gn,
                     NS, BLOCK_NS)


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


def _block_p(delta: LoRADelta | None) -> int:
    """Partials a pending expand loads at once: at least 8, so that the shrink's split (which follows the
    token count, up to lora.PARTIALS) never compiles another variant; more for SiLU's early shrink of a
    wide MLP (one partial per 1024 columns)."""
    if delta is None:
        return 1
    return max(8, triton.next_power_of_2(delta.h.shape[0] if delta.h.dim() == 3 else 1))


def _shrink_args(shrink: LoRAShrink | None, rows: int, partials: int, block: int, warps: int,
                 fallback: torch.Tensor) -> tuple[tuple, dict]:
    """The early shrink's output (made here and left in ``shrink.h``: [partials, rows, N] float32), A,
    slots and strides, with its constexprs NS (0: none) and BLOCK_NS (rows of A a step: about 64
    elements a thread)."""
    if shrink is None:
        return (fallback,) * 3 + (0,) * 6, {"NS": 0, "BLOCK_NS": 1}
    a = shrink.lora_a
    n = a.shape[1]
    h = torch.empty(partials, rows, n, dtype=torch.float32, device=a.device)
    shrink.h = h
    block_ns = max(1, min(triton.next_power_of_2(n), 64 * 32 * warps // block))
    return (h, a, shrink.token_slots, *h.stride()[1:], *a.stride(), h.stride(0)), {"NS": n, "BLOCK_NS": block_ns}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             delta: LoRADelta | None = None, shrink: LoRAShrink | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = _rows(x)
    r_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, r_dtype), device=x.device)
    res2 = _rows(residual) if residual is not None else x2
    r = torch.empty(x2.shape, dtype=r_dtype, device=x.device) if residual is not None else y
    block = triton.next_power_of_2(n)
    warps = min(16, max(1, block // 256))
    shrink_args, shrink_consts = _shrink_args(shrink, x2.shape[0], 1, block, warps, x2)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight, y, r, x2.stride(0), res2.stride(0), y.stride(0), r.stride(0), n, eps,
            *_delta_args(delta, x2), *shrink_args,
            HAS_RES=residual is not None, HAS_DELTA=delta is not None, BLOCK=block, BLOCK_R=_block_r(delta),
            BLOCK_P=_block_p(delta),
            **shrink_consts, num_warps=warps,
        )
    y = y.view(*x.shape[:-1], n)
    return y if residual is None else (y, r.view(*x.shape[:-1], n))


@triton.jit(do_not_specialize=["P", "s_hp", "s_gt", "s_gp"])
def _silu_and_mul_kernel(x_ptr, y_ptr, s_x, s_y, INTER,
                         h_ptr, b_ptr, sc_ptr, slots_ptr, P, R, s_hp, s_ht, s_hn, s_bs, s_bo, s_br,
                         g_ptr, a_ptr, gsl_ptr, s_gt, s_gn, s_as, s_an, s_ah, s_gp,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                         NS: tl.constexpr, BLOCK_NS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * s_x + INTER + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # slice 0 (gate) is h[:R] through B's first INTER rows, slice 1 (up) h[R:2R] the rest
        gate = _lora_delta(gate, row, cols, mask, 0, 0, h_ptr, b_ptr, sc_ptr, slots_ptr, P, R,
                           s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R, BLOCK_P)
        up = _lora_delta(up, row, cols, mask, R, INTER, h_ptr, b_ptr, sc_ptr, slots_ptr, P, R,
                         s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R, BLOCK_P)
    gf = gate.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(gate.dtype)
    y = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    tl.store(y_ptr + row * s_y + cols, y, mask=mask)
    if NS > 0:  # the down projection's early shrink: this program's columns make partial sum pid(1)
        _lora_shrink(y.to(tl.float32), row, cols, mask, g_ptr + tl.program_id(1) * s_gp + row * s_gt, a_ptr, gsl_ptr,
                     s_as, s_an, s_ah, s_gn, NS, BLOCK_NS)


def silu_and_mul(x: torch.Tensor, delta: LoRADelta | None = None, shrink: LoRAShrink | None = None) -> torch.Tensor:
    inter = x.shape[-1] // 2
    x2 = _rows(x)
    y = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    blocks = triton.cdiv(inter, block)
    shrink_args, shrink_consts = _shrink_args(shrink, x2.shape[0], blocks, block, 4, x2)
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], blocks)](
            x2, y, x2.stride(0), y.stride(0), inter, *_delta_args(delta, x2), *shrink_args,
            HAS_DELTA=delta is not None, BLOCK=block, BLOCK_R=_block_r(delta), BLOCK_P=_block_p(delta),
            **shrink_consts, num_warps=4,
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
def _norm_rope_heads(src_ptr, col0, dst_ptr, s_dst_h, w_ptr, eps, c1, c2, s1, s2, dst_slot, t, h_off,
                     lh_ptr, lb_ptr, lsc_ptr, lsl_ptr, P, R, s_hp, s_ht, s_hn, s_bs, s_bo, s_br,
                     HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                     HAS_NORM: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    """Heads [HEADS, 2*HALF] at src + col0 (contiguous heads): the pending LoRA expand (its slice's h at
    h_off), optional per-head RMSNorm, RoPE, store at dst."""
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < HEADS) & (d < HALF)
    cols = col0 + h * (2 * HALF) + d
    x1 = tl.load(src_ptr + cols, mask=mask, other=0.0)
    x2 = tl.load(src_ptr + cols + HALF, mask=mask, other=0.0)
    if HAS_DELTA:
        x1 = _lora_delta(x1, t, cols, mask, h_off, 0, lh_ptr, lb_ptr, lsc_ptr, lsl_ptr, P, R,
                         s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R, BLOCK_P)
        x2 = _lora_delta(x2, t, cols + HALF, mask, h_off, 0, lh_ptr, lb_ptr, lsc_ptr, lsl_ptr, P, R,
                         s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R, BLOCK_P)
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


# P and the partials' stride of a pending LoRA expand follow the step's token count (see _rms_norm_kernel).
@triton.jit(do_not_specialize=["P", "s_hp"])
def _qk_norm_rope_kv_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, kc_ptr, vc_ptr, slots_ptr,
                            s_qkv, s_q, s_cos, s_sin, s_cn, s_cb, s_ch, s_dn, s_db, s_dh, eps,
                            lh_ptr, lb_ptr, lsc_ptr, lsl_ptr, P, R, s_hp, s_ht, s_hn, s_bs, s_bo, s_br,
                            H: tl.constexpr, HKV: tl.constexpr, H_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
                            HALF: tl.constexpr, HALF_PAD: tl.constexpr, BS: tl.constexpr, HAS_NORM: tl.constexpr,
                            HAS_DELTA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
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
    _norm_rope_heads(row, 0, q_ptr + t * s_q, 2 * HALF, qw_ptr, eps, c1, c2, s1, s2, t, t, 0,
                     lh_ptr, lb_ptr, lsc_ptr, lsl_ptr, P, R, s_hp, s_ht, s_hn, s_bs, s_bo, s_br,
                     H, H_PAD, HALF, HALF_PAD, HAS_NORM, HAS_DELTA, BLOCK_R, BLOCK_P)
    blk = tl.maximum(slot, 0) // BS
    off = tl.maximum(slot, 0) % BS
    _norm_rope_heads(row, H * 2 * HALF, kc_ptr + blk * s_cn + off * s_cb, s_ch, kw_ptr, eps, c1, c2, s1, s2,
                     slot, t, R, lh_ptr, lb_ptr, lsc_ptr, lsl_ptr, P, R, s_hp, s_ht, s_hn, s_bs, s_bo, s_br,
                     HKV, HKV_PAD, HALF, HALF_PAD, HAS_NORM, HAS_DELTA, BLOCK_R, BLOCK_P)
    h = tl.arange(0, HKV_PAD)[:, None]
    dv = tl.arange(0, 2 * HALF_PAD)[None, :]
    vmask = (h < HKV) & (dv < 2 * HALF)
    cols = (H + HKV) * 2 * HALF + h * (2 * HALF) + dv
    v = tl.load(row + cols, mask=vmask, other=0.0)
    if HAS_DELTA:
        v = _lora_delta(v, t, cols, vmask, 2 * R, 0, lh_ptr, lb_ptr, lsc_ptr, lsl_ptr, P, R,
                        s_hp, s_ht, s_hn, s_bs, s_bo, s_br, BLOCK_R, BLOCK_P)
    vmask = vmask & ((tl.zeros([HKV_PAD, 2 * HALF_PAD], tl.int64) + slot) >= 0)
    tl.store(vc_ptr + blk * s_dn + off * s_db + h * s_dh + dv, v.to(vc_ptr.dtype.element_ty), mask=vmask)


def qk_norm_rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          num_heads: int, num_kv_heads: int, q_norm_weight: torch.Tensor | None,
                          k_norm_weight: torch.Tensor | None, eps: float, delta: LoRADelta | None = None
                          ) -> torch.Tensor:
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
    h_pad, block_r = triton.next_power_of_2(num_heads), _block_r(delta)
    # a pending expand holds [heads, half, rank] products: about 64 float32 a thread
    warps = 4 if delta is None else min(16, max(4, h_pad * triton.next_power_of_2(half) * block_r // 2048))
    _qk_norm_rope_kv_kernel[(num_tokens,)](
        qkv, positions, cos, sin, q_norm_weight if has_norm else cos, k_norm_weight if has_norm else cos,
        q, k_cache, v_cache, slot_mapping, qkv.stride(0), q.stride(0), cos.stride(0), sin.stride(0),
        *k_cache.stride()[:3], *v_cache.stride()[:3], eps, *_delta_args(delta, qkv),
        H=num_heads, HKV=num_kv_heads, H_PAD=h_pad,
        HKV_PAD=triton.next_power_of_2(num_kv_heads), HALF=half, HALF_PAD=triton.next_power_of_2(half),
        BS=k_cache.shape[1], HAS_NORM=has_norm, HAS_DELTA=delta is not None, BLOCK_R=block_r,
        BLOCK_P=_block_p(delta),
        num_warps=warps, enable_fp_fusion=False,
    )
    return q
