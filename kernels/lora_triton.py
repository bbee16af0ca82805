"""Triton LoRA kernels (Punica-style tiled SGMV and BGMV), twins of ``lora_torch``.

Shapes: T tokens, S slots, R max rank, n slices, N = n*R, H_in input size,
O = sum(out_slices). Slot ids < 0 mark base-model rows; they get no work.

SGMV works on the tile table of ``lora_plan``: program (tile, column block, k split) of the
shrink, (tile, slice, column chunk) of the expand; a tile's rows are gathered through
``tiles.rows``. BGMV has one program row per token. Shrink splits H_in into ``p`` partial sums
written with plain stores to ``buf[:p]`` of a ``[P, T, N]`` float32 buffer (no zeroing, no
atomics) and returns that view; expand sums the partials as it loads them and adds
``scale * h_i @ B_i.T`` into each output slice of ``y`` in one launch (up to ``MAX_SLICES``).
The fused kernels (``sgmv_lora``, ``bgmv_lora``) do both in one launch: program (tile or token,
slice, column chunk) computes its rows' h of that slice in registers over all of H_in, then adds
it into its chunk of y; no buffer, and h is recomputed once per chunk (the chunk rules below).

No kernel takes a batch-dependent integer that Triton would specialise on (ints equal to 1 or
divisible by 16 compile separate variants): those are ``do_not_specialize``, and the tile count is
only a grid size. Wrappers do no host syncs and allocate only when no ``buf`` is given, so they
can be captured in CUDA graphs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .lora_plan import LoRATiles
from .variants import count_compiled

MAX_SLICES = 3
_PROGRAMS_PER_SM = 8  # split K / chunk columns until a launch has about this many programs per SM (v1: 1024 on H100)
_HALF = (torch.float16, torch.bfloat16)


@triton.jit
def _slice_bounds(sl, OUT0, OUT1, OUT2):
    off = tl.where(sl >= 1, OUT0, 0) + tl.where(sl >= 2, OUT1, 0)
    size = tl.where(sl == 0, OUT0, tl.where(sl == 1, OUT1, OUT2))
    return off, size


@triton.jit
def _tile_rows(rows_ptr, tiles_ptr, BLOCK_M: tl.constexpr):
    """(slot, token rows [BLOCK_M] int64, row mask) of this program's tile."""
    entry = tiles_ptr + tl.program_id(0) * 4
    slot = tl.load(entry).to(tl.int64)
    idx = tl.load(entry + 1) + tl.arange(0, BLOCK_M)
    ok = idx < tl.load(entry + 2)  # unused entries: first = end = -1
    rows = tl.load(rows_ptr + idx, mask=ok, other=0).to(tl.int64)
    return slot, rows, ok


@triton.jit
def _sgmv_program(rows_ptr, tiles_ptr, OUT0, OUT1, OUT2, COL_ITERS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """An SGMV expand program's (slice, its offset and size, first column, slot, rows, row mask)."""
    sl = tl.program_id(1)
    off, size = _slice_bounds(sl, OUT0, OUT1, OUT2)
    n_begin = tl.program_id(2) * COL_ITERS * BLOCK_N
    slot, rows, row_ok = _tile_rows(rows_ptr, tiles_ptr, BLOCK_M)
    return sl, off, size, n_begin, slot, rows, row_ok


@triton.jit
def _tile_expand(h, w_base, y_rows, r_ok, row_ok, off, size, n_begin, COL_ITERS, sw_o, sy_o,
                 BLOCK_N: tl.constexpr, TF32: tl.constexpr):
    """y[rows, off + cols] += h @ B[cols].T for COL_ITERS blocks of BLOCK_N columns from n_begin (SGMV
    expands): h [BLOCK_M, BLOCK_R] float32 (scaled), w_base the slot's B at rank rows, y_rows the tile's rows."""
    for it in range(COL_ITERS):
        cols = n_begin + it * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < size
        w = tl.load(w_base + (off + cols[None, :]) * sw_o, mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        if TF32:  # exact for 16-bit B; rounds h to 10 mantissa bits
            d = tl.dot(h, w.to(tl.float32), input_precision="tf32")
        else:
            d = tl.dot(h, w.to(tl.float32), input_precision="ieee")
        y_ptrs = y_rows + (off + cols[None, :]) * sy_o
        y_mask = row_ok[:, None] & col_ok[None, :]
        yv = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (yv.to(tl.float32) + d).to(yv.dtype), mask=y_mask)


@triton.jit(do_not_specialize=["SPLIT", "sb_p"])
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, buf_ptr, rows_ptr, tiles_ptr,
    H, N, SPLIT,
    sx_t, sx_h, sa_s, sa_n, sa_h, sb_p, sb_t, sb_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF_DOT: tl.constexpr,
):
    slot, rows, row_ok = _tile_rows(rows_ptr, tiles_ptr, BLOCK_M)
    if slot < 0:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    x_rows = x_ptr + rows[:, None] * sx_t
    a_base = a_ptr + slot * sa_s + cols[None, :] * sa_n
    for k0 in range(tl.program_id(2) * BLOCK_K, H, SPLIT * BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_rows + ks[None, :] * sx_h, mask=row_ok[:, None] & (ks[None, :] < H), other=0.0)
        at = tl.load(a_base + ks[:, None] * sa_h, mask=(ks[:, None] < H) & (cols[None, :] < N), other=0.0)
        if HALF_DOT:
            acc = tl.dot(xt, at, acc)
        else:
            acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
    out_ptrs = buf_ptr + tl.program_id(2) * sb_p + rows[:, None] * sb_t + cols[None, :] * sb_n
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & (cols[None, :] < N))


@triton.jit(do_not_specialize=["P", "COL_ITERS", "sb_p"])
def _sgmv_expand_kernel(
    y_ptr, buf_ptr, b_ptr, scales_ptr, rows_ptr, tiles_ptr,
    R, P, COL_ITERS, OUT0, OUT1, OUT2,
    sy_t, sy_o, sb_p, sb_t, sb_n, sw_s, sw_o, sw_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, TF32: tl.constexpr,
):
    sl, off, size, n_begin, slot, rows, row_ok = _sgmv_program(rows_ptr, tiles_ptr, OUT0, OUT1, OUT2, COL_ITERS,
                                                              BLOCK_M, BLOCK_N)
    if (slot < 0) | (n_begin >= size):
        return
    rs = tl.arange(0, BLOCK_R)
    h_ptrs = buf_ptr + rows[:, None] * sb_t + (sl * R + rs[None, :]) * sb_n
    h_mask = row_ok[:, None] & (rs[None, :] < R)
    h = tl.load(h_ptrs, mask=h_mask, other=0.0)
    for p in range(1, P):
        h += tl.load(h_ptrs + p * sb_p, mask=h_mask, other=0.0)
    h = h * tl.load(scales_ptr + slot)
    _tile_expand(h, b_ptr + slot * sw_s + rs[:, None] * sw_r, y_ptr + rows[:, None] * sy_t, rs < R, row_ok, off, size,
                 n_begin, COL_ITERS, sw_o, sy_o, BLOCK_N, TF32)


@triton.jit(do_not_specialize=["SPLIT", "sb_p"])
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, buf_ptr, slots_ptr,
    H, N, SPLIT,
    sx_t, sx_h, sa_s, sa_n, sa_h, sb_p, sb_t, sb_n,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    a_base = a_ptr + slot * sa_s + cols[:, None] * sa_n
    for k0 in range(tl.program_id(2) * BLOCK_K, H, SPLIT * BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + t * sx_t + ks * sx_h, mask=ks < H, other=0.0).to(tl.float32)
        at = tl.load(a_base + ks[None, :] * sa_h, mask=(cols[:, None] < N) & (ks[None, :] < H), other=0.0)
        acc += tl.sum(at.to(tl.float32) * xv[None, :], axis=1)
    tl.store(buf_ptr + tl.program_id(2) * sb_p + t * sb_t + cols * sb_n, acc, mask=cols < N)


@triton.jit(do_not_specialize=["P", "sb_p"])
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


@triton.jit(do_not_specialize=["COL_ITERS"])
def _sgmv_lora_kernel(
    y_ptr, x_ptr, a_ptr, b_ptr, scales_ptr, rows_ptr, tiles_ptr,
    H, R, COL_ITERS, OUT0, OUT1, OUT2,
    sy_t, sy_o, sx_t, sx_h, sa_s, sa_n, sa_h, sw_s, sw_o, sw_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    HALF_DOT: tl.constexpr, TF32: tl.constexpr,
):
    """Fused SGMV, program (tile, slice, column chunk): the tile's h of its slice, then its columns of y."""
    sl, off, size, n_begin, slot, rows, row_ok = _sgmv_program(rows_ptr, tiles_ptr, OUT0, OUT1, OUT2, COL_ITERS,
                                                              BLOCK_M, BLOCK_N)
    if (slot < 0) | (n_begin >= size):
        return
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    h = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    x_rows = x_ptr + rows[:, None] * sx_t
    a_base = a_ptr + slot * sa_s + (sl * R + rs[None, :]) * sa_n
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_rows + ks[None, :] * sx_h, mask=row_ok[:, None] & (ks[None, :] < H), other=0.0)
        at = tl.load(a_base + ks[:, None] * sa_h, mask=(ks[:, None] < H) & r_ok[None, :], other=0.0)
        if HALF_DOT:
            h = tl.dot(xt, at, h)
        else:
            h = tl.dot(xt.to(tl.float32), at.to(tl.float32), h, input_precision="ieee")
    h = h * tl.load(scales_ptr + slot)
    _tile_expand(h, b_ptr + slot * sw_s + rs[:, None] * sw_r, y_ptr + rows[:, None] * sy_t, rs < R, row_ok, off, size,
                 n_begin, COL_ITERS, sw_o, sy_o, BLOCK_N, TF32)


@triton.jit(do_not_specialize=["COL_ITERS"])
def _bgmv_lora_kernel(
    y_ptr, x_ptr, a_ptr, b_ptr, scales_ptr, slots_ptr,
    H, R, COL_ITERS, OUT0, OUT1, OUT2,
    sy_t, sy_o, sx_t, sx_h, sa_s, sa_n, sa_h, sw_s, sw_o, sw_r,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Fused BGMV, program (token, slice, column chunk): the token's h of its slice, then its columns
    of y. Each block of B and y is loaded one step ahead (the first before the shrink), so a
    program's loads overlap instead of queueing behind each other."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    sl = tl.program_id(1)
    off, size = _slice_bounds(sl, OUT0, OUT1, OUT2)
    n_begin = tl.program_id(2) * COL_ITERS * BLOCK_N
    if (slot < 0) | (n_begin >= size):
        return
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    cols = n_begin + tl.arange(0, BLOCK_N)
    w_base = b_ptr + slot * sw_s + off * sw_o + rs[None, :] * sw_r
    y_base = y_ptr + t * sy_t + off * sy_o
    w = tl.load(w_base + cols[:, None] * sw_o, mask=(cols < size)[:, None] & r_ok[None, :], other=0.0)
    yv = tl.load(y_base + cols * sy_o, mask=cols < size, other=0.0)
    h = tl.zeros((BLOCK_R,), tl.float32)
    a_base = a_ptr + slot * sa_s + (sl * R + rs[:, None]) * sa_n
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + t * sx_t + ks * sx_h, mask=ks < H, other=0.0).to(tl.float32)
        at = tl.load(a_base + ks[None, :] * sa_h, mask=r_ok[:, None] & (ks[None, :] < H), other=0.0)
        h += tl.sum(at.to(tl.float32) * xv[None, :], axis=1)
    h = h * tl.load(scales_ptr + slot)
    end = tl.minimum(size, n_begin + COL_ITERS * BLOCK_N)
    for _ in range(COL_ITERS):
        d = tl.sum(w.to(tl.float32) * h[None, :], axis=1)
        tl.store(y_base + cols * sy_o, (yv.to(tl.float32) + d).to(yv.dtype), mask=cols < end)
        cols += BLOCK_N
        w = tl.load(w_base + cols[:, None] * sw_o, mask=(cols < end)[:, None] & r_ok[None, :], other=0.0)
        yv = tl.load(y_base + cols * sy_o, mask=cols < end, other=0.0)


_INTERPRETED = type(_sgmv_shrink_kernel).__name__ == "InterpretedFunction"
KERNELS = (_sgmv_shrink_kernel, _sgmv_expand_kernel, _bgmv_shrink_kernel, _bgmv_expand_kernel,
           _sgmv_lora_kernel, _bgmv_lora_kernel)


def _half_dot(*dtypes: torch.dtype) -> bool:
    """Feed tl.dot 16-bit operands natively (else upcast to float32); the Triton interpreter's bf16 dot is wrong."""
    same = all(d == dtypes[0] for d in dtypes) and dtypes[0] in _HALF
    return same and not (_INTERPRETED and dtypes[0] == torch.bfloat16)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=16)
def _target_programs(device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return _PROGRAMS_PER_SM * sms


def _split_k(programs: int, h_in: int, block_k: int, parts: int, device: torch.device,
             asked: int | None = None) -> int:
    """Partial sums over H_in: as asked, else enough programs for the device; never more than the
    buffer's partials."""
    want = asked or min(triton.cdiv(h_in, block_k), _target_programs(device) // max(programs, 1))
    return max(1, min(want, parts))


def _shrink_buf(x: torch.Tensor, n: int, buf: torch.Tensor | None) -> torch.Tensor:
    """[P, T, N] float32 (a [T, N] buf is seen as P = 1)."""
    if buf is None:
        return torch.empty((1, x.shape[0], n), dtype=torch.float32, device=x.device)
    return buf if buf.dim() == 3 else buf.unsqueeze(0)


def _h_view(buf: torch.Tensor, given: torch.Tensor | None, split: int) -> torch.Tensor:
    """What shrink returns: the partials it wrote, or the caller's [T, N] buffer itself."""
    return given if given is not None and given.dim() == 2 else buf[:split]


def _h3(h: torch.Tensor) -> torch.Tensor:
    return h if h.dim() == 3 else h.unsqueeze(0)


def _outs(out_slices: Sequence[int]) -> tuple[int, int, int]:
    assert 1 <= len(out_slices) <= MAX_SLICES, f"expand takes 1..{MAX_SLICES} slices, got {list(out_slices)}"
    o = [int(v) for v in out_slices] + [0] * (MAX_SLICES - len(out_slices))
    return o[0], o[1], o[2]


def _warps(*block: int) -> int:
    return 8 if block[0] * block[1] >= 8192 else 4


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, tiles: LoRATiles, buf: torch.Tensor | None = None,
                split_k: int | None = None) -> torch.Tensor:
    """Tiled SGMV shrink: h float32 from ``x[T, H_in]`` and ``lora_a[S, N, H_in]``.

    for slot, first, end, _ in tiles.table:       # lora_plan: rows of one slot per tile
        rows = tiles.rows[first:end]
        h.sum(0)[rows] = x[rows].float() @ lora_a[slot].float().T
    buf [P, T, N] (or [T, N]: no split): h = buf[:p], p <= P partial sums over H_in (split_k overrides
    the choice); rows of base tokens are not written.
    """
    h_in, n = x.shape[1], lora_a.shape[1]
    block_m, block_n, block_k = tiles.block_m, min(64, _pow2(n)), 64
    b3 = _shrink_buf(x, n, buf)
    grid_mn = (tiles.num_tiles, triton.cdiv(n, block_n))
    split = _split_k(grid_mn[0] * grid_mn[1], h_in, block_k, b3.shape[0], x.device, split_k)
    if grid_mn[0] > 0:
        _sgmv_shrink_kernel[(*grid_mn, split)](
            x, lora_a, b3, tiles.rows, tiles.table, h_in, n, split,
            x.stride(0), x.stride(1), *lora_a.stride(), *b3.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HALF_DOT=_half_dot(x.dtype, lora_a.dtype),
            num_warps=_warps(block_m, block_n),
        )
    return _h_view(b3, buf, split)


def sgmv_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                out_slices: Sequence[int], tiles: LoRATiles) -> None:
    """Tiled SGMV expand, all slices in one launch; ``y[T, O]`` in place.

    h [T, n*R] or [p, T, n*R] (partials, summed) float32, lora_b [S, O, R], scales [S] float32,
    out_slices: n sizes summing to O.
    for slot, first, end, _ in tiles.table:
        rows = tiles.rows[first:end]
        for i, (off, out) in enumerate(slices):  # off = sum(out_slices[:i])
            y[rows, off:off+out] += scales[slot] * h.sum(0)[rows, i*R:(i+1)*R] @ lora_b[slot, off:off+out].float().T
    """
    r, h3 = lora_b.shape[2], _h3(h)
    block_m, block_r = tiles.block_m, _pow2(r)
    block_n = 128 if block_r <= 32 and block_m <= 64 else 64  # 128 x 128 float32 tiles spill
    col_blocks = triton.cdiv(max(out_slices), block_n)
    programs = tiles.num_tiles * len(out_slices)
    iters = max(1, min(col_blocks, programs * col_blocks // _target_programs(y.device)))
    grid = (tiles.num_tiles, len(out_slices), triton.cdiv(col_blocks, iters))
    if grid[0] == 0:
        return
    _sgmv_expand_kernel[grid](
        y, h3, lora_b, scales, tiles.rows, tiles.table, r, h3.shape[0], iters, *_outs(out_slices),
        *y.stride(), *h3.stride(), *lora_b.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, TF32=lora_b.dtype in _HALF,
        num_warps=_warps(block_m, block_n),
    )


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                buf: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """BGMV shrink: h float32 from ``x[T, H_in]``, ``lora_a[S, N, H_in]``, ``token_slots[>=T]``.

    for t in range(T):
        s = token_slots[t]
        if s >= 0:
            h.sum(0)[t] = lora_a[s].float() @ x[t].float()
    buf and the returned h as for sgmv_shrink.
    """
    t_num, h_in, n = x.shape[0], x.shape[1], lora_a.shape[1]
    block_n, block_k = min(32, _pow2(n)), 256
    b3 = _shrink_buf(x, n, buf)
    grid_tn = (t_num, triton.cdiv(n, block_n))
    split = _split_k(grid_tn[0] * grid_tn[1], h_in, block_k, b3.shape[0], x.device, split_k)
    if t_num > 0:
        _bgmv_shrink_kernel[(*grid_tn, split)](
            x, lora_a, b3, token_slots, h_in, n, split,
            x.stride(0), x.stride(1), *lora_a.stride(), *b3.stride(),
            BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return _h_view(b3, buf, split)


def bgmv_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                out_slices: Sequence[int], token_slots: torch.Tensor) -> None:
    """BGMV expand, all slices in one launch; ``y[T, O]`` in place.

    h [T, n*R] or [p, T, n*R] (partials, summed) float32, lora_b [S, O, R], scales [S] float32,
    token_slots [>=T].
    for t in range(T):
        s = token_slots[t]
        for i, (off, out) in enumerate(slices):  # off = sum(out_slices[:i])
            if s >= 0:
                y[t, off:off+out] += scales[s] * lora_b[s, off:off+out].float() @ h.sum(0)[t, i*R:(i+1)*R]
    """
    r, h3 = lora_b.shape[2], _h3(h)
    block_r = _pow2(r, lo=4)
    block_n = max(16, min(256, 4096 // block_r))
    grid = (y.shape[0], len(out_slices), triton.cdiv(max(out_slices), block_n))
    if grid[0] == 0:
        return
    _bgmv_expand_kernel[grid](
        y, h3, lora_b, scales, token_slots, r, h3.shape[0], *_outs(out_slices),
        *y.stride(), *h3.stride(), *lora_b.stride(),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )


# Fused shrink+expand (one launch): every program of (rows, slice, column chunk) recomputes its
# slice's h from all of H_in before it adds h @ B.T into its chunk of y. H_in cannot be split over
# programs (h must be whole before the expand), so a program's shrink is a serial loop; the chunk
# rules trade that recomputation against parallelism (measured on an H200, bf16, rank 16, graphs):
# - BGMV: square tiles, BLOCK_K = BLOCK_N = tile / BLOCK_R, one block of columns per program. A
#   program reads R x H_in of A (from L2 after the first token of a slot) and as many columns of B
#   as its tile is wide, so A's share of its bytes stays about H_in / chunk; tiles of 16k elements
#   (8 warps: 1024 x 16 at rank 16) below H_in 4096, 32k (16 warps) from it: there the smaller
#   tiles' serial K steps cost Llama-3-8B decode 1.2-1.5x, below it the larger cost Qwen3-0.6B 5-30%.
# - SGMV: a program re-reads its tile's block_m x H_in rows of x, the expand's columns cost
#   block_m x chunk of y. With few tiles, narrow chunks spread the work over the SMs; with many,
#   x's re-reads dominate, so columns per program grow with the tiles (best of 0.5-3 measured):
#   chunk = H_in x (tiles x slices) / (SGMV_ROW_PROGRAMS_PER_SM x SMs), one block at least.
# COL_ITERS is not specialised on, so no chunk width compiles a new variant.
BGMV_TILES = ((4096, 16384, 8), (1 << 62, 32768, 16))  # (H_in below, tile elements, warps)
SGMV_BLOCK_K = 128
SGMV_ROW_PROGRAMS_PER_SM = 1.0


def _sgmv_col_iters(col_blocks: int, block_n: int, programs: int, h_in: int, device: torch.device,
                    asked: int | None) -> int:
    """Column blocks per program of the fused SGMV: as asked, else the rule above; 1..col_blocks."""
    sms = _target_programs(device) // _PROGRAMS_PER_SM
    want = asked or int(h_in * programs / (SGMV_ROW_PROGRAMS_PER_SM * sms)) // block_n
    return max(1, min(want, col_blocks))


def _bgmv_blocks(r: int, h_in: int, out: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_N, BLOCK_K, num_warps) of the fused BGMV; out: the widest slice."""
    tile, warps = next((t, w) for below, t, w in BGMV_TILES if h_in < below)
    block_r = _pow2(r, lo=4)
    side = max(16, tile // block_r)
    return block_r, min(_pow2(out), side), min(_pow2(h_in), side), warps


def sgmv_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
              out_slices: Sequence[int], tiles: LoRATiles, col_iters: int | None = None) -> None:
    """Fused tiled SGMV (shrink and expand in one launch, h never leaves the program); ``y[T, O]`` in place.

    x [T, H_in], lora_a [S, n*R, H_in], lora_b [S, O, R], scales [S] float32, out_slices: n sizes summing to O.
    for slot, first, end, _ in tiles.table:
        rows = tiles.rows[first:end]
        for i, (off, out) in enumerate(slices):  # off = sum(out_slices[:i])
            h = scales[slot] * x[rows].float() @ lora_a[slot, i*R:(i+1)*R].float().T
            y[rows, off:off+out] += h @ lora_b[slot, off:off+out].float().T
    col_iters: column blocks per program (default: the chunk rule above).
    """
    h_in, r = x.shape[1], lora_b.shape[2]
    block_m, block_r = tiles.block_m, _pow2(r)
    block_n = 128 if block_r <= 32 and block_m <= 64 else 64  # 128 x 128 float32 tiles spill
    col_blocks = triton.cdiv(max(out_slices), block_n)
    programs = tiles.num_tiles * len(out_slices)
    iters = _sgmv_col_iters(col_blocks, block_n, programs, h_in, y.device, col_iters)
    grid = (tiles.num_tiles, len(out_slices), triton.cdiv(col_blocks, iters))
    if grid[0] == 0:
        return
    _sgmv_lora_kernel[grid](
        y, x, lora_a, lora_b, scales, tiles.rows, tiles.table, h_in, r, iters, *_outs(out_slices),
        *y.stride(), *x.stride(), *lora_a.stride(), *lora_b.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_K=SGMV_BLOCK_K,
        HALF_DOT=_half_dot(x.dtype, lora_a.dtype), TF32=lora_b.dtype in _HALF,
        num_warps=_warps(block_m, block_n),
    )


def bgmv_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
              out_slices: Sequence[int], token_slots: torch.Tensor, col_iters: int | None = None) -> None:
    """Fused BGMV (shrink and expand in one launch); ``y[T, O]`` in place.

    x [T, H_in], lora_a [S, n*R, H_in], lora_b [S, O, R], scales [S] float32, token_slots [>=T].
    for t in range(T):
        s = token_slots[t]
        for i, (off, out) in enumerate(slices):  # off = sum(out_slices[:i])
            if s >= 0:
                h = scales[s] * lora_a[s, i*R:(i+1)*R].float() @ x[t].float()
                y[t, off:off+out] += lora_b[s, off:off+out].float() @ h
    col_iters: column blocks per program (default 1: chunks of BLOCK_N columns, see above).
    """
    t_num, h_in, r = x.shape[0], x.shape[1], lora_b.shape[2]
    block_r, block_n, block_k, warps = _bgmv_blocks(r, h_in, max(out_slices))
    col_blocks = triton.cdiv(max(out_slices), block_n)
    iters = max(1, min(col_iters or 1, col_blocks))
    grid = (t_num, len(out_slices), triton.cdiv(col_blocks, iters))
    if t_num == 0:
        return
    _bgmv_lora_kernel[grid](
        y, x, lora_a, lora_b, scales, token_slots, h_in, r, iters, *_outs(out_slices),
        *y.stride(), *x.stride(), *lora_a.stride(), *lora_b.stride(),
        BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps,
    )


def compiled_variants() -> int:
    """Kernel binaries compiled so far in this process, over every kernel of KERNELS (0 in the interpreter)."""
    return count_compiled(KERNELS)
