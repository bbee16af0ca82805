"""Triton SGMV/BGMV LoRA kernels (Punica-style), twins of ``lora_torch``.

Shapes: T tokens, S slots, R max rank, n slices, N = n*R, H_in input size,
O = sum(out_slices). Slot ids < 0 mark base-model rows.

Shrink writes ``buf[T, N]`` in float32 (rows of base tokens are set to 0);
with split-K it zeroes ``buf`` first and accumulates with atomics. Expand adds
``scale * buf_i @ B_i.T`` into each output slice of ``y`` in one launch (up to
``MAX_SLICES`` slices). Wrappers do no host syncs and allocate only when no
``buf`` is given, so they can be captured in CUDA graphs; an SGMV launch sized
for ``max_seg_len`` stays valid as long as no segment grows beyond it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

MAX_SLICES = 3
_TARGET_PROGRAMS = 1024  # split K until a shrink launch has about this many programs
_HALF = (torch.float16, torch.bfloat16)


@triton.jit
def _slice_bounds(sl, OUT0, OUT1, OUT2):
    off = tl.where(sl >= 1, OUT0, 0) + tl.where(sl >= 2, OUT1, 0)
    size = tl.where(sl == 0, OUT0, tl.where(sl == 1, OUT1, OUT2))
    return off, size


@triton.jit
def _segment_rows(seg_starts_ptr, seg_slots_ptr, pid, M_BLOCKS, BLOCK_M: tl.constexpr):
    seg = pid // M_BLOCKS
    start = tl.load(seg_starts_ptr + seg)
    end = tl.load(seg_starts_ptr + seg + 1)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    row0 = start + (pid % M_BLOCKS) * BLOCK_M
    return row0 + tl.arange(0, BLOCK_M), row0, end, slot


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, buf_ptr, seg_starts_ptr, seg_slots_ptr,
    H, N, M_BLOCKS, SPLIT_K,
    sx_t, sx_h, sa_s, sa_n, sa_h, sb_t, sb_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, HALF_DOT: tl.constexpr,
):
    rows, row0, end, slot = _segment_rows(seg_starts_ptr, seg_slots_ptr, tl.program_id(0), M_BLOCKS, BLOCK_M)
    if row0 >= end:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = (rows[:, None] < end) & (cols[None, :] < N)
    out_ptrs = buf_ptr + rows[:, None] * sb_t + cols[None, :] * sb_n
    if slot < 0:
        if not ATOMIC:
            tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), mask=out_mask)
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    a_base = a_ptr + slot * sa_s + cols[None, :] * sa_n
    for k0 in range(tl.program_id(2) * BLOCK_K, H, SPLIT_K * BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[:, None] * sx_t + ks[None, :] * sx_h,
                     mask=(rows[:, None] < end) & (ks[None, :] < H), other=0.0)
        at = tl.load(a_base + ks[:, None] * sa_h, mask=(ks[:, None] < H) & (cols[None, :] < N), other=0.0)
        if HALF_DOT:
            acc = tl.dot(xt, at, acc)
        else:
            acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, buf_ptr, slots_ptr,
    H, N, SPLIT_K,
    sx_t, sx_h, sa_s, sa_n, sa_h, sb_t, sb_n,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = buf_ptr + t * sb_t + cols * sb_n
    if slot < 0:
        if not ATOMIC:
            tl.store(out_ptrs, tl.zeros((BLOCK_N,), tl.float32), mask=cols < N)
        return
    acc = tl.zeros((BLOCK_N,), tl.float32)
    a_base = a_ptr + slot * sa_s + cols[:, None] * sa_n
    for k0 in range(tl.program_id(2) * BLOCK_K, H, SPLIT_K * BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + t * sx_t + ks * sx_h, mask=ks < H, other=0.0).to(tl.float32)
        at = tl.load(a_base + ks[None, :] * sa_h, mask=(cols[:, None] < N) & (ks[None, :] < H), other=0.0)
        acc += tl.sum(at.to(tl.float32) * xv[None, :], axis=1)
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=cols < N)
    else:
        tl.store(out_ptrs, acc, mask=cols < N)


@triton.jit
def _sgmv_expand_kernel(
    y_ptr, buf_ptr, b_ptr, scales_ptr, seg_starts_ptr, seg_slots_ptr,
    R, M_BLOCKS, OUT0, OUT1, OUT2,
    sy_t, sy_o, sb_t, sb_n, sw_s, sw_o, sw_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, TF32: tl.constexpr,
):
    rows, row0, end, slot = _segment_rows(seg_starts_ptr, seg_slots_ptr, tl.program_id(0), M_BLOCKS, BLOCK_M)
    sl = tl.program_id(1)
    off, size = _slice_bounds(sl, OUT0, OUT1, OUT2)
    n0 = tl.program_id(2) * BLOCK_N
    if (slot < 0) | (row0 >= end) | (n0 >= size):
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    row_ok = rows < end
    h = tl.load(buf_ptr + rows[:, None] * sb_t + (sl * R + rs[None, :]) * sb_n,
                mask=row_ok[:, None] & (rs[None, :] < R), other=0.0)
    w = tl.load(b_ptr + slot * sw_s + (off + cols[None, :]) * sw_o + rs[:, None] * sw_r,
                mask=(rs[:, None] < R) & (cols[None, :] < size), other=0.0)
    if TF32:  # exact for 16-bit B; rounds buf to 10 mantissa bits
        d = tl.dot(h, w.to(tl.float32), input_precision="tf32")
    else:
        d = tl.dot(h, w.to(tl.float32), input_precision="ieee")
    y_ptrs = y_ptr + rows[:, None] * sy_t + (off + cols[None, :]) * sy_o
    y_mask = row_ok[:, None] & (cols[None, :] < size)
    yv = tl.load(y_ptrs, mask=y_mask, other=0.0)
    out = yv.to(tl.float32) + d * tl.load(scales_ptr + slot)
    tl.store(y_ptrs, out.to(yv.dtype), mask=y_mask)


@triton.jit
def _bgmv_expand_kernel(
    y_ptr, buf_ptr, b_ptr, scales_ptr, slots_ptr,
    R, OUT0, OUT1, OUT2,
    sy_t, sy_o, sb_t, sb_n, sw_s, sw_o, sw_r,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    sl = tl.program_id(1)
    off, size = _slice_bounds(sl, OUT0, OUT1, OUT2)
    n0 = tl.program_id(2) * BLOCK_N
    if (slot < 0) | (n0 >= size):
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    h = tl.load(buf_ptr + t * sb_t + (sl * R + rs) * sb_n, mask=rs < R, other=0.0)
    w = tl.load(b_ptr + slot * sw_s + (off + cols[:, None]) * sw_o + rs[None, :] * sw_r,
                mask=(cols[:, None] < size) & (rs[None, :] < R), other=0.0)
    d = tl.sum(w.to(tl.float32) * h[None, :], axis=1) * tl.load(scales_ptr + slot)
    y_ptrs = y_ptr + t * sy_t + (off + cols) * sy_o
    yv = tl.load(y_ptrs, mask=cols < size, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + d).to(yv.dtype), mask=cols < size)


_INTERPRETED = type(_sgmv_shrink_kernel).__name__ == "InterpretedFunction"


def _half_dot(*dtypes: torch.dtype) -> bool:
    """Feed tl.dot 16-bit operands natively (else upcast to float32); the Triton interpreter's bf16 dot is wrong."""
    same = all(d == dtypes[0] for d in dtypes) and dtypes[0] in _HALF
    return same and not (_INTERPRETED and dtypes[0] == torch.bfloat16)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _split_k(programs: int, h_in: int, block_k: int) -> int:
    return max(1, min(triton.cdiv(h_in, block_k), _TARGET_PROGRAMS // max(programs, 1)))


def _block_m(max_seg_len: int) -> int:
    return min(64, _pow2(max_seg_len))


def _shrink_buf(x: torch.Tensor, n: int, buf: torch.Tensor | None, split_k: int) -> torch.Tensor:
    if buf is None:
        buf = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    if split_k > 1:
        buf.zero_()
    return buf


def _outs(out_slices: Sequence[int]) -> tuple[int, int, int]:
    assert 1 <= len(out_slices) <= MAX_SLICES, f"expand takes 1..{MAX_SLICES} slices, got {list(out_slices)}"
    o = [int(v) for v in out_slices] + [0] * (MAX_SLICES - len(out_slices))
    return o[0], o[1], o[2]


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                max_seg_len: int, buf: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """SGMV shrink: ``buf[T, N] (float32)`` from ``x[T, H_in]`` and ``lora_a[S, N, H_in]``.

    for g in range(num_segs):                    # seg_starts [num_segs+1], seg_slots [num_segs]
        s, e, slot = seg_starts[g], seg_starts[g+1], seg_slots[g]
        buf[s:e] = x[s:e].float() @ lora_a[slot].float().T if slot >= 0 else 0
    max_seg_len >= every e - s (sizes the launch); split_k overrides the split-K heuristic.
    """
    h_in, n = x.shape[1], lora_a.shape[1]
    block_m, block_n, block_k = _block_m(max_seg_len), min(64, _pow2(n)), 64
    m_blocks = triton.cdiv(max(max_seg_len, 1), block_m)
    grid_mn = (seg_slots.shape[0] * m_blocks, triton.cdiv(n, block_n))
    split_k = split_k or _split_k(grid_mn[0] * grid_mn[1], h_in, block_k)
    buf = _shrink_buf(x, n, buf, split_k)
    if grid_mn[0] == 0:
        return buf
    _sgmv_shrink_kernel[(*grid_mn, split_k)](
        x, lora_a, buf, seg_starts, seg_slots, h_in, n, m_blocks, split_k,
        x.stride(0), x.stride(1), *lora_a.stride(), *buf.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=split_k > 1, HALF_DOT=_half_dot(x.dtype, lora_a.dtype),
    )
    return buf


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                buf: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """BGMV shrink: ``buf[T, N] (float32)`` from ``x[T, H_in]``, ``lora_a[S, N, H_in]``, ``token_slots[>=T]``.

    for t in range(T):
        s = token_slots[t]
        buf[t] = lora_a[s].float() @ x[t].float() if s >= 0 else 0
    split_k overrides the split-K heuristic.
    """
    t_num, h_in, n = x.shape[0], x.shape[1], lora_a.shape[1]
    block_n, block_k = min(32, _pow2(n)), 256
    grid_tn = (t_num, triton.cdiv(n, block_n))
    split_k = split_k or _split_k(grid_tn[0] * grid_tn[1], h_in, block_k)
    buf = _shrink_buf(x, n, buf, split_k)
    if t_num == 0:
        return buf
    _bgmv_shrink_kernel[(*grid_tn, split_k)](
        x, lora_a, buf, token_slots, h_in, n, split_k,
        x.stride(0), x.stride(1), *lora_a.stride(), *buf.stride(),
        BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=split_k > 1,
    )
    return buf


def sgmv_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                out_slices: Sequence[int], seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                max_seg_len: int) -> None:
    """SGMV expand, all slices in one launch; ``y[T, O]`` in place.

    buf [T, n*R] float32, lora_b [S, O, R], scales [S] float32, out_slices: n sizes summing to O.
    for g in range(num_segs):
        s, e, slot = seg_starts[g], seg_starts[g+1], seg_slots[g]
        for i, (off, out) in enumerate(slices):  # off = sum(out_slices[:i])
            if slot >= 0:
                y[s:e, off:off+out] += scales[slot] * buf[s:e, i*R:(i+1)*R] @ lora_b[slot, off:off+out].float().T
    """
    r = lora_b.shape[2]
    block_m, block_r = _block_m(max_seg_len), _pow2(r)
    block_n = 128 if block_r <= 32 else 64
    m_blocks = triton.cdiv(max(max_seg_len, 1), block_m)
    grid = (seg_slots.shape[0] * m_blocks, len(out_slices), triton.cdiv(max(out_slices), block_n))
    if grid[0] == 0:
        return
    _sgmv_expand_kernel[grid](
        y, buf, lora_b, scales, seg_starts, seg_slots, r, m_blocks, *_outs(out_slices),
        *y.stride(), *buf.stride(), *lora_b.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, TF32=lora_b.dtype in _HALF,
    )


def bgmv_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                out_slices: Sequence[int], token_slots: torch.Tensor) -> None:
    """BGMV expand, all slices in one launch; ``y[T, O]`` in place.

    buf [T, n*R] float32, lora_b [S, O, R], scales [S] float32, token_slots [>=T].
    for t in range(T):
        s = token_slots[t]
        for i, (off, out) in enumerate(slices):  # off = sum(out_slices[:i])
            if s >= 0:
                y[t, off:off+out] += scales[s] * lora_b[s, off:off+out].float() @ buf[t, i*R:(i+1)*R]
    """
    r = lora_b.shape[2]
    block_r = _pow2(r, lo=4)
    block_n = max(16, min(256, 4096 // block_r))
    grid = (y.shape[0], len(out_slices), triton.cdiv(max(out_slices), block_n))
    if grid[0] == 0:
        return
    _bgmv_expand_kernel[grid](
        y, buf, lora_b, scales, token_slots, r, *_outs(out_slices),
        *y.stride(), *buf.stride(), *lora_b.stride(),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )
