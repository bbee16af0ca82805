"""Frozen copy of loraplex's LoRA kernels before tiled SGMV (commit 5b764ed), the "old" side of
``bench/lora_kernels.py --sweep``. Benchmark reference only: nothing in the package imports it.

SGMV here launches ``num_segs * cdiv(max_seg_len, BLOCK_M)`` programs per column block (one long
segment is split, but every segment gets as many row blocks as the longest), passes batch-dependent
integers (M_BLOCKS, SPLIT_K, strides) that Triton specialises, and zeroes the shrink buffer for
atomics above PARTIALS_MAX_TOKENS tokens. ``add_lora`` is the Triton path of the old dispatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl
from torch import Tensor

Kind = Literal["auto", "sgmv", "bgmv"]

BGMV_MAX_SEG_LEN = 2
PARTIALS, PARTIALS_MAX_TOKENS = 8, 512

@dataclass
class LoRABatchMeta:
    """Which adapter slot each token of a batch uses, as tokens and as segments."""

    token_slots: Tensor  # [T] int32 (or padded with -1 to max tokens): slot per token, -1 = base row
    seg_starts: Tensor  # [num_segs+1] int32: segment g covers tokens [seg_starts[g], seg_starts[g+1])
    seg_slots: Tensor  # [num_segs] int32: slot of each segment, -1 = base rows
    num_tokens: int  # T
    num_segs: int
    max_seg_len: int  # longest segment, base segments included (sizes SGMV launches)
    no_lora: bool  # every token is a base row: callers skip LoRA

    @classmethod
    def build(cls, token_slots: Sequence[int] | Tensor, device: torch.device | str | None = None
              ) -> LoRABatchMeta:
        """Segments are maximal runs of consecutive tokens that share a slot."""
        slots = torch.as_tensor(token_slots, dtype=torch.int32, device="cpu").flatten()
        t = slots.numel()
        if t == 0:
            starts = torch.zeros(1, dtype=torch.int32)
        else:
            cuts = torch.nonzero(slots[1:] != slots[:-1]).flatten().to(torch.int32) + 1
            starts = torch.cat([torch.tensor([0], dtype=torch.int32), cuts, torch.tensor([t], dtype=torch.int32)])
        seg_slots = slots[starts[:-1].long()]
        lens = starts[1:] - starts[:-1]
        return cls(
            token_slots=slots.to(device),
            seg_starts=starts.to(device),
            seg_slots=seg_slots.to(device),
            num_tokens=t,
            num_segs=seg_slots.numel(),
            max_seg_len=int(lens.max()) if t else 0,
            no_lora=bool((slots < 0).all()),
        )


def lora_buffer(num_tokens: int, lora_a: Tensor, partials: int | None = None) -> Tensor:
    """Float32 shrink scratch for add_lora: [T, n*R] (partials=0), or [P, T, n*R] for P partial sums
    over H_in; by default P = PARTIALS up to PARTIALS_MAX_TOKENS tokens, else 0.

    Preallocate one per layer shape and batch size for CUDA graphs; contents need no initialising.
    """
    if partials is None:
        partials = PARTIALS if num_tokens <= PARTIALS_MAX_TOKENS else 0
    shape = (num_tokens, lora_a.shape[1]) if partials <= 0 else (partials, num_tokens, lora_a.shape[1])
    return torch.empty(shape, dtype=torch.float32, device=lora_a.device)


def _check(x: Tensor, y: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor, out_slices: Sequence[int]) -> None:
    s, nr, h_in = lora_a.shape
    r = lora_b.shape[2]
    if x.shape[1] != h_in or nr != len(out_slices) * r:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} does not fit x {tuple(x.shape)}, "
                         f"{len(out_slices)} slices of rank {r}")
    if lora_b.shape[:2] != (s, sum(out_slices)) or y.shape != (x.shape[0], sum(out_slices)):
        raise ValueError(f"lora_b {tuple(lora_b.shape)} / y {tuple(y.shape)} do not fit out_slices "
                         f"{list(out_slices)} and {s} slots")
    if scales.shape != (s,) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 [{s}], got {scales.dtype} {tuple(scales.shape)}")


MAX_SLICES = 3
_TARGET_PROGRAMS = 1024  # split K until a shrink launch has about this many programs
_MAX_SPLIT_K = 32  # bounds the atomics per buffer element
STORE, ATOMIC, PARTIAL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # how shrink writes buf
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
    sx_t, sx_h, sa_s, sa_n, sa_h, sb_p, sb_t, sb_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MODE: tl.constexpr, HALF_DOT: tl.constexpr,
):
    rows, row0, end, slot = _segment_rows(seg_starts_ptr, seg_slots_ptr, tl.program_id(0), M_BLOCKS, BLOCK_M)
    if row0 >= end:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = (rows[:, None] < end) & (cols[None, :] < N)
    out_ptrs = buf_ptr + tl.program_id(2) * sb_p + rows[:, None] * sb_t + cols[None, :] * sb_n
    if slot < 0:
        if MODE != ATOMIC:
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
    if MODE == ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, buf_ptr, slots_ptr,
    H, N, SPLIT_K,
    sx_t, sx_h, sa_s, sa_n, sa_h, sb_p, sb_t, sb_n,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = buf_ptr + tl.program_id(2) * sb_p + t * sb_t + cols * sb_n
    if slot < 0:
        if MODE != ATOMIC:
            tl.store(out_ptrs, tl.zeros((BLOCK_N,), tl.float32), mask=cols < N)
        return
    acc = tl.zeros((BLOCK_N,), tl.float32)
    a_base = a_ptr + slot * sa_s + cols[:, None] * sa_n
    for k0 in range(tl.program_id(2) * BLOCK_K, H, SPLIT_K * BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + t * sx_t + ks * sx_h, mask=ks < H, other=0.0).to(tl.float32)
        at = tl.load(a_base + ks[None, :] * sa_h, mask=(cols[:, None] < N) & (ks[None, :] < H), other=0.0)
        acc += tl.sum(at.to(tl.float32) * xv[None, :], axis=1)
    if MODE == ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=cols < N)
    else:
        tl.store(out_ptrs, acc, mask=cols < N)


@triton.jit
def _sgmv_expand_kernel(
    y_ptr, buf_ptr, b_ptr, scales_ptr, seg_starts_ptr, seg_slots_ptr,
    R, P, M_BLOCKS, OUT0, OUT1, OUT2,
    sy_t, sy_o, sb_p, sb_t, sb_n, sw_s, sw_o, sw_r,
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
    h_ptrs = buf_ptr + rows[:, None] * sb_t + (sl * R + rs[None, :]) * sb_n
    h_mask = row_ok[:, None] & (rs[None, :] < R)
    h = tl.load(h_ptrs, mask=h_mask, other=0.0)
    for p in range(1, P):
        h += tl.load(h_ptrs + p * sb_p, mask=h_mask, other=0.0)
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
    R, P, OUT0, OUT1, OUT2,
    sy_t, sy_o, sb_p, sb_t, sb_n, sw_s, sw_o, sw_r,
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
    h_ptrs = buf_ptr + t * sb_t + (sl * R + rs) * sb_n
    h = tl.load(h_ptrs, mask=rs < R, other=0.0)
    for p in range(1, P):
        h += tl.load(h_ptrs + p * sb_p, mask=rs < R, other=0.0)
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
    return max(1, min(triton.cdiv(h_in, block_k), _TARGET_PROGRAMS // max(programs, 1), _MAX_SPLIT_K))


def _block_m(max_seg_len: int) -> int:
    return min(64, _pow2(max_seg_len))


def _shrink_buf(x: torch.Tensor, n: int, buf: torch.Tensor | None, split_k: int) -> tuple[torch.Tensor, int, int]:
    """(buf, split_k, mode): a [P, T, N] buf takes P partial sums; a [T, N] one is zeroed for atomics."""
    if buf is not None and buf.dim() == 3:
        return buf, buf.shape[0], PARTIAL.value if buf.shape[0] > 1 else STORE.value
    if buf is None:
        buf = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    if split_k > 1:
        buf.zero_()
    return buf, split_k, ATOMIC.value if split_k > 1 else STORE.value


def _buf_strides(buf: torch.Tensor) -> tuple[int, int, int]:
    """(partial, token, column) strides of a [T, N] or [P, T, N] buffer."""
    return (0, *buf.stride()) if buf.dim() == 2 else tuple(buf.stride())  # type: ignore[return-value]


def _parts(buf: torch.Tensor) -> int:
    return 1 if buf.dim() == 2 else buf.shape[0]


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
    A buf [P, T, N] receives P partial sums over H_in instead (buf.sum(0) is the result).
    """
    h_in, n = x.shape[1], lora_a.shape[1]
    block_m, block_n, block_k = _block_m(max_seg_len), min(64, _pow2(n)), 64
    m_blocks = triton.cdiv(max(max_seg_len, 1), block_m)
    grid_mn = (seg_slots.shape[0] * m_blocks, triton.cdiv(n, block_n))
    buf, split_k, mode = _shrink_buf(x, n, buf, split_k or _split_k(grid_mn[0] * grid_mn[1], h_in, block_k))
    if grid_mn[0] == 0:
        return buf
    _sgmv_shrink_kernel[(*grid_mn, split_k)](
        x, lora_a, buf, seg_starts, seg_slots, h_in, n, m_blocks, split_k,
        x.stride(0), x.stride(1), *lora_a.stride(), *_buf_strides(buf),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, MODE=mode, HALF_DOT=_half_dot(x.dtype, lora_a.dtype),
    )
    return buf


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                buf: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """BGMV shrink: ``buf[T, N] (float32)`` from ``x[T, H_in]``, ``lora_a[S, N, H_in]``, ``token_slots[>=T]``.

    for t in range(T):
        s = token_slots[t]
        buf[t] = lora_a[s].float() @ x[t].float() if s >= 0 else 0
    split_k overrides the split-K heuristic; a buf [P, T, N] receives P partial sums over H_in.
    """
    t_num, h_in, n = x.shape[0], x.shape[1], lora_a.shape[1]
    block_n, block_k = min(32, _pow2(n)), 256
    grid_tn = (t_num, triton.cdiv(n, block_n))
    buf, split_k, mode = _shrink_buf(x, n, buf, split_k or _split_k(grid_tn[0] * grid_tn[1], h_in, block_k))
    if t_num == 0:
        return buf
    _bgmv_shrink_kernel[(*grid_tn, split_k)](
        x, lora_a, buf, token_slots, h_in, n, split_k,
        x.stride(0), x.stride(1), *lora_a.stride(), *_buf_strides(buf),
        BLOCK_N=block_n, BLOCK_K=block_k, MODE=mode,
    )
    return buf


def sgmv_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                out_slices: Sequence[int], seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                max_seg_len: int) -> None:
    """SGMV expand, all slices in one launch; ``y[T, O]`` in place.

    buf [T, n*R] (or [P, T, n*R] partials, summed) float32, lora_b [S, O, R], scales [S] float32,
    out_slices: n sizes summing to O.
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
        y, buf, lora_b, scales, seg_starts, seg_slots, r, _parts(buf), m_blocks, *_outs(out_slices),
        *y.stride(), *_buf_strides(buf), *lora_b.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, TF32=lora_b.dtype in _HALF,
    )


def bgmv_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                out_slices: Sequence[int], token_slots: torch.Tensor) -> None:
    """BGMV expand, all slices in one launch; ``y[T, O]`` in place.

    buf [T, n*R] (or [P, T, n*R] partials, summed) float32, lora_b [S, O, R], scales [S] float32,
    token_slots [>=T].
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
        y, buf, lora_b, scales, token_slots, r, _parts(buf), *_outs(out_slices),
        *y.stride(), *_buf_strides(buf), *lora_b.stride(),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )


def use_bgmv(meta: LoRABatchMeta, kind: Kind = "auto") -> bool:
    """BGMV when asked, or in auto mode when every segment is short (decode-like batches)."""
    if kind not in ("auto", "sgmv", "bgmv"):
        raise ValueError(f"kind must be 'auto', 'sgmv' or 'bgmv', got {kind!r}")
    return kind == "bgmv" or (kind == "auto" and meta.max_seg_len <= BGMV_MAX_SEG_LEN)


def add_lora(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
             out_slices: Sequence[int], meta: LoRABatchMeta, *, buf: Tensor | None = None,
             kind: Kind = "auto") -> None:
    """In place, one shrink and one expand for all n slices of a fused layer.

    y [T, O], x [T, H_in], lora_a [S, n*R, H_in], lora_b [S, O, R], scales [S] float32,
    out_slices: n ints summing to O, buf: scratch from lora_buffer (optional; preallocate for CUDA graphs).
    for t in range(T):
        s = meta.token_slots[t]
        for i, out in enumerate(out_slices):      # off = sum(out_slices[:i])
            if s >= 0:
                y[t, off:off+out] += scales[s] * (x[t] @ lora_a[s, i*R:(i+1)*R].T) @ lora_b[s, off:off+out].T
    """
    if meta.no_lora:
        return
    _check(x, y, lora_a, lora_b, scales, out_slices)
    if buf is None:
        buf = lora_buffer(x.shape[0], lora_a)
    if use_bgmv(meta, kind):
        h = bgmv_shrink(x, lora_a, meta.token_slots, buf)
        bgmv_expand(y, h, lora_b, scales, out_slices, meta.token_slots)
    else:
        h = sgmv_shrink(x, lora_a, meta.seg_starts, meta.seg_slots, meta.max_seg_len, buf)
        sgmv_expand(y, h, lora_b, scales, out_slices, meta.seg_starts, meta.seg_slots,
                    meta.max_seg_len)

