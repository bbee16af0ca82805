"""Batched multi-LoRA ops (Punica SGMV/BGMV): public API, batch metadata and device dispatch.

Stacked adapter weights of one base linear layer fused from n projections:
  lora_a [S, n*R, H_in]   slice i's A in rows [i*R, i*R + r_i), zero-padded
  lora_b [S, O, R]        O = sum(out_slices); slice i's B in rows [off_i, off_i+out_i), cols [0, r_i)
  scales [S] float32      per slot scale
S slots, R max rank; a token whose slot id is -1 is a base-model row.

CUDA tensors run the Triton kernels (``lora_triton``), others the float32
torch references (``lora_torch``); ``backend="triton"`` forces the kernels
(on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from . import lora_torch

Backend = Literal["auto", "triton", "torch"]
Kind = Literal["auto", "sgmv", "bgmv"]

BGMV_MAX_SEG_LEN = 2  # add_lora takes the per-token (BGMV) kernels when no segment is longer
# Shrink scratch of add_lora: P partial sums over H_in (no zeroing kernel, no atomics) up to
# PARTIALS_MAX_TOKENS tokens, above that [T, N] with split-K by atomics. Chosen on an H100 (bench --sweep).
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


def _ops(x: Tensor, backend: Backend) -> ModuleType:
    if backend == "torch" or (backend == "auto" and x.device.type != "cuda"):
        return lora_torch
    if backend not in ("auto", "triton"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    from . import lora_triton  # imported lazily: triton is only needed on the kernel path

    return lora_triton


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


def sgmv_shrink(x: Tensor, lora_a: Tensor, meta: LoRABatchMeta, buf: Tensor | None = None,
                backend: Backend = "auto") -> Tensor:
    """Segment shrink. x [T, H_in], lora_a [S, N, H_in], buf [T, N] float32 (optional, preallocated;
    a [P, T, N] buf receives P partial sums over H_in instead, buf.sum(0) being the result).

    for g in range(meta.num_segs):
        s, e, slot = meta.seg_starts[g], meta.seg_starts[g+1], meta.seg_slots[g]
        buf[s:e] = x[s:e].float() @ lora_a[slot].float().T if slot >= 0 else 0
    return buf
    """
    return _ops(x, backend).sgmv_shrink(x, lora_a, meta.seg_starts, meta.seg_slots,
                                        max_seg_len=meta.max_seg_len, buf=buf)


def bgmv_shrink(x: Tensor, lora_a: Tensor, meta: LoRABatchMeta, buf: Tensor | None = None,
                backend: Backend = "auto") -> Tensor:
    """Per-token shrink. x [T, H_in], lora_a [S, N, H_in], buf [T, N] or [P, T, N] float32 (optional,
    as for sgmv_shrink).

    for t in range(T):
        s = meta.token_slots[t]
        buf[t] = lora_a[s].float() @ x[t].float() if s >= 0 else 0
    return buf
    """
    return _ops(x, backend).bgmv_shrink(x, lora_a, meta.token_slots, buf=buf)


def sgmv_expand(y: Tensor, buf: Tensor, lora_b: Tensor, scales: Tensor, out_slices: Sequence[int],
                meta: LoRABatchMeta, backend: Backend = "auto") -> None:
    """Segment expand, every slice in one launch. y [T, O] (in place), buf [T, n*R] float32
    (or [P, T, n*R] partials, summed on load), lora_b [S, O, R], scales [S] float32, out_slices: n ints
    summing to O.

    for g in range(meta.num_segs):
        s, e, slot = meta.seg_starts[g], meta.seg_starts[g+1], meta.seg_slots[g]
        for i, out in enumerate(out_slices):      # off = sum(out_slices[:i])
            if slot >= 0:
                y[s:e, off:off+out] += scales[slot] * buf[s:e, i*R:(i+1)*R] @ lora_b[slot, off:off+out].float().T
    """
    _ops(y, backend).sgmv_expand(y, buf, lora_b, scales, out_slices, meta.seg_starts, meta.seg_slots,
                                 max_seg_len=meta.max_seg_len)


def bgmv_expand(y: Tensor, buf: Tensor, lora_b: Tensor, scales: Tensor, out_slices: Sequence[int],
                meta: LoRABatchMeta, backend: Backend = "auto") -> None:
    """Per-token expand, every slice in one launch. y [T, O] (in place), buf [T, n*R] float32
    (or [P, T, n*R] partials, summed on load), lora_b [S, O, R], scales [S] float32, out_slices: n ints
    summing to O.

    for t in range(T):
        s = meta.token_slots[t]
        for i, out in enumerate(out_slices):      # off = sum(out_slices[:i])
            if s >= 0:
                y[t, off:off+out] += scales[s] * lora_b[s, off:off+out].float() @ buf[t, i*R:(i+1)*R]
    """
    _ops(y, backend).bgmv_expand(y, buf, lora_b, scales, out_slices, meta.token_slots)


def use_bgmv(meta: LoRABatchMeta, kind: Kind = "auto") -> bool:
    """BGMV when asked, or in auto mode when every segment is short (decode-like batches)."""
    if kind not in ("auto", "sgmv", "bgmv"):
        raise ValueError(f"kind must be 'auto', 'sgmv' or 'bgmv', got {kind!r}")
    return kind == "bgmv" or (kind == "auto" and meta.max_seg_len <= BGMV_MAX_SEG_LEN)


def add_lora(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
             out_slices: Sequence[int], meta: LoRABatchMeta, *, buf: Tensor | None = None,
             backend: Backend = "auto", kind: Kind = "auto") -> None:
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
        h = bgmv_shrink(x, lora_a, meta, buf, backend)
        bgmv_expand(y, h, lora_b, scales, out_slices, meta, backend)
    else:
        h = sgmv_shrink(x, lora_a, meta, buf, backend)
        sgmv_expand(y, h, lora_b, scales, out_slices, meta, backend)
