"""Triton skinny GEMM ``y = x @ W^T (+ bias)`` for few rows of x (decode): streams W once at HBM speed.

A program owns ``BLOCK_N`` rows of W (output columns), ``BLOCK_M`` rows of x and one of ``split_k``
ranges of K; it walks its K range in ``BLOCK_K`` tiles loaded along K (W rows are contiguous: wide
vector loads), accumulating in float32 in one of three ways (``mode``):

- ``fma``: multiply-add on CUDA cores into a [BLOCK_M, BLOCK_N, BLOCK_K] accumulator reduced over K once
  after the loop (a GEMV for one row; a few rows share each W tile);
- ``dot``: tensor cores, ``x[BM, BK] @ W[BN, BK]^T`` with x padded to BM >= 16 rows;
- ``dot_swap``: tensor cores the other way round, ``W[BN, BK] @ x[BM, BK]^T``, so W's rows fill the
  MMA's large dimension.

With ``split_k > 1`` the K ranges write float32 partials that a second launch sums (``reduce =
"partials"``), or add them atomically into a zeroed float32 buffer that a second launch casts
(``"atomic"``); bias and the cast to the output dtype happen in that second launch.

Specialisation: M varies per step and is never specialised (``do_not_specialize``); N, K, the
K range per split and the strides are per-layer constants, so each layer shape compiles once per
config and a decode step never recompiles. Nothing reads a tensor value on the host and every
buffer is allocated by torch's caching allocator, so the launches can be captured in CUDA graphs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from .gemv import GemvConfig

MODES = {"fma": 0, "dot": 1, "dot_swap": 2}
OUT_DIRECT, OUT_PARTIALS, OUT_ATOMIC = 0, 1, 2
REDUCE_BLOCK = 256


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, p_ptr, M, N, K, K_SPLIT, s_xm, s_wn, s_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
                 OUT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past M or N wrap onto valid ones: every load is in bounds, only the store is masked
    rows_x = (offs_m % M).to(tl.int64)
    rows_w = (offs_n % N).to(tl.int64)
    k_lo = pid_k * K_SPLIT
    k_hi = k_lo + K_SPLIT
    if not EVEN_K:
        k_hi = tl.minimum(k_hi, K)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_x[:, None] * s_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + rows_w[:, None] * s_wn + (k_lo + offs_k)[None, :]
    if MODE == 0:
        if BLOCK_M == 1:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    elif MODE == 1:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            k_ok = (k + offs_k) < k_hi
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        if MODE == 0:
            if BLOCK_M == 1:
                acc2 += w.to(tl.float32) * xt.to(tl.float32)
            else:
                acc3 += xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        elif DOT_F32:
            if MODE == 1:
                acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc_t = tl.dot(w.to(tl.float32), tl.trans(xt.to(tl.float32)), acc_t, input_precision="ieee")
        elif MODE == 1:
            acc = tl.dot(xt, tl.trans(w), acc)
        else:
            acc_t = tl.dot(w, tl.trans(xt), acc_t)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if MODE == 0:
        if BLOCK_M == 1:
            acc = tl.sum(acc2, 1)[None, :]
        else:
            acc = tl.sum(acc3, 2)
    elif MODE == 2:
        acc = tl.trans(acc_t)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if OUT == 0:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows_w)[None, :].to(tl.float32)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    elif OUT == 1:
        p_ptrs = p_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(p_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=["M"])
def _reduce_kernel(p_ptr, b_ptr, y_ptr, M, N, SPLITS, s_ym, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n] = sum_s p[s, m, n] (+ bias[n]), cast to y's dtype."""
    m = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(p_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * s_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _dot_f32(dtype: torch.dtype) -> bool:
    """float32 dots (IEEE, no TF32) for float32 inputs, and for 16-bit ones under the interpreter
    (its bf16 dot is wrong)."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def k_per_split(k: int, cfg: GemvConfig) -> int:
    """K range of one split: a whole number of BLOCK_K tiles (the last split may be short or empty)."""
    return triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, cfg: GemvConfig) -> None:
    """y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]); x, w, y contiguous along their last dim, M, N, K > 0."""
    m, k = x.shape
    n = w.shape[0]
    k_split = k_per_split(k, cfg)
    out = OUT_DIRECT if cfg.split_k == 1 else (OUT_ATOMIC if cfg.reduce == "atomic" else OUT_PARTIALS)
    if out == OUT_PARTIALS:
        partials = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device)
    elif out == OUT_ATOMIC:
        partials = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        partials = y  # unused
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k, triton.cdiv(m, cfg.block_m))
    _gemv_kernel[grid](
        x, w, bias if bias is not None else w, y, partials, m, n, k, k_split, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, MODE=MODES[cfg.mode], OUT=out,
        HAS_BIAS=bias is not None, EVEN_K=k_split * cfg.split_k == k,
        DOT_F32=_dot_f32(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if out != OUT_DIRECT:
        block = min(REDUCE_BLOCK, triton.next_power_of_2(n))  # small blocks: many SMs share the few bytes
        _reduce_kernel[(triton.cdiv(n, block), m)](
            partials, bias if bias is not None else partials, y, m, n, cfg.split_k if out == OUT_PARTIALS else 1,
            y.stride(0), HAS_BIAS=bias is not None, BLOCK=block, num_warps=2,
        )
