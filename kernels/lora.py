"""Batched multi-LoRA ops (Punica SGMV/BGMV): public API, batch metadata and device dispatch.

Stacked adapter weights of one base linear layer fused from n projections:
  lora_a [S, n*R, H_in]   slice i's A in rows [i*R, i*R + r_i), zero-padded
  lora_b [S, O, R]        O = sum(out_slices); slice i's B in rows [off_i, off_i+out_i), cols [0, r_i)
  scales [S] float32      per slot scale
S slots, R max rank; a token whose slot id is -1 is a base-model row.

Two paths (``lora_plan.plan`` picks one per batch shape): BGMV, one program row per token, for
decode-like batches; tiled SGMV for the rest, whose work is tiles of at most ``block_m`` rows of
one slot (``lora_plan``), so a long single-adapter segment spreads over many programs and base
rows cost nothing. Either path runs as two launches, shrink into a float32 ``h`` then expand
(``shrink``/``expand``), or as one fused launch (``fused_lora``, ``add_lora(fused=True)``) whose
programs each compute their rows' ``h`` of one slice and add it, through B, into a chunk of y's
columns. CUDA tensors run the Triton kernels (``lora_triton``), others the float32 torch
references (``lora_torch``); ``backend="triton"`` forces the kernels (on CPU under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from . import lora_plan, lora_torch
from .lora_plan import LoRAPlan, LoRATiles, plan

Backend = Literal["auto", "triton", "torch"]
Kind = Literal["auto", "sgmv", "bgmv"]

__all__ = ["LoRABatchMeta", "LoRADelta", "LoRAPlan", "LoRAShrink", "LoRATiles", "add_lora", "bgmv_expand", "bgmv_shrink", "expand",
           "fused_lora", "lora_buffer", "plan", "route", "sgmv_expand", "sgmv_shrink", "shrink", "use_bgmv",
           "warmup"]

DEFAULT_RANK = 16  # the rank LoRABatchMeta.build plans its tiles for when not told
# Shrink scratch [P, T, N]: P partial sums over H_in (split-K without atomics or zeroing); fewer as T
# grows, since tiles then fill the GPU by themselves: P = PARTIALS up to PARTIALS_MAX_TOKENS tokens,
# halving per doubling of T above it, down to 1.
PARTIALS, PARTIALS_MAX_TOKENS = 8, 4096


@dataclass
class LoRABatchMeta:
    """Which adapter slot each token of a batch uses; SGMV tile tables are made on first use, per tile size."""

    token_slots: Tensor  # [T] int32 on the device (or padded with -1 to a graph's batch): slot per token
    seg_starts: Tensor | None  # [num_segs+1] int32 (host): maximal runs of one slot; informational
    seg_slots: Tensor | None  # [num_segs] int32 (host): slot of each run
    num_tokens: int  # T
    num_segs: int
    max_seg_len: int  # longest run, base runs included
    no_lora: bool  # every token is a base row: callers skip LoRA
    num_slots: int | None = None  # distinct adapters in the batch; None = unknown (slots only on the device)
    lora_tokens: int | None = None  # tokens with slot >= 0; None = unknown
    plan: LoRAPlan | None = None  # fixes the path for every layer (else lora_plan.plan per layer rank)
    _host: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)
    _tiles: dict[int, LoRATiles] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, token_slots: Sequence[int] | Tensor | np.ndarray, device: torch.device | str | None = None,
              rank: int = DEFAULT_RANK) -> LoRABatchMeta:
        """From the host's token -> slot map, once per step: tokens grouped by slot, the plan for
        ``rank``, and its tile table (if SGMV) sent with the slots in one copy."""
        slots = _host_slots(token_slots)
        seg_starts, seg_slots = lora_plan.host_segments(slots)
        rows, sorted_slots = lora_plan.group_rows(slots)
        distinct = lora_plan.count_groups(sorted_slots)
        p = plan(len(slots), distinct, rank, len(rows))
        table = lora_plan.host_table(sorted_slots, p.block_m) if p.kind == "sgmv" and distinct else None
        parts = lora_plan.upload([slots] if table is None else [slots, rows, table], device)
        meta = cls(token_slots=parts[0], seg_starts=torch.from_numpy(seg_starts),
                   seg_slots=torch.from_numpy(seg_slots), num_tokens=len(slots), num_segs=len(seg_slots),
                   max_seg_len=int(np.diff(seg_starts).max(initial=0)), no_lora=distinct == 0,
                   num_slots=distinct, lora_tokens=len(rows))
        meta._host = (rows, sorted_slots)
        if table is not None:
            meta._tiles[p.block_m] = LoRATiles(parts[1], parts[2].view(-1, 4), len(table), p.block_m)
        return meta

    @classmethod
    def on_device(cls, token_slots: Tensor, plan: LoRAPlan | None = None) -> LoRABatchMeta:
        """Slots that live only on the device (a CUDA graph's persistent [B] buffer, refilled per replay).
        No host sync; SGMV tiles are built by device ops at first use, so a captured graph rebuilds them
        each replay. Without a plan the batch is planned as one adapter per token (BGMV)."""
        t = token_slots.numel()
        return cls(token_slots=token_slots, seg_starts=None, seg_slots=None, num_tokens=t, num_segs=t,
                   max_seg_len=t, no_lora=False, plan=plan)

    def plan_for(self, rank: int) -> LoRAPlan:
        return self.plan or plan(self.num_tokens, self.num_slots, rank, self.lora_tokens)

    def tiles(self, block_m: int, num_slots: int) -> LoRATiles:
        """The SGMV tile table for tiles of ``block_m`` rows (cached); num_slots: S of the weights."""
        if block_m not in self._tiles:
            if self._host is not None:
                rows, sorted_slots = self._host
                self._tiles[block_m] = lora_plan.host_tiles(rows, sorted_slots, block_m, self.token_slots.device)
            else:
                slots = self.token_slots[:self.num_tokens]
                self._tiles[block_m] = lora_plan.device_tiles(slots, block_m, num_slots)
        return self._tiles[block_m]


@dataclass
class LoRADelta:
    """A BGMV expand computed later, by the op that consumes the layer's output (``fused.rms_norm``,
    ``fused.silu_and_mul``: one launch fewer per LoRA layer): y += scales[s] * B[s] @ h[t] per token
    t of slot s = token_slots[t] >= 0, slice by slice, h summed over its partials."""

    h: Tensor  # [P, T, n*R] or [T, n*R] float32, from shrink
    lora_b: Tensor  # [S, sum(out_slices), R]
    scales: Tensor  # [S] float32
    out_slices: tuple[int, ...]
    token_slots: Tensor  # [>=T] int32

    def applied(self, y: Tensor, backend: Backend = "auto") -> Tensor:
        """y + the delta, as ``expand`` would leave it (a new tensor; the torch twins' path)."""
        out = y.clone()
        _ops(out, backend).bgmv_expand(out, self.h, self.lora_b, self.scales, self.out_slices, self.token_slots)
        return out


@dataclass
class LoRAShrink:
    """A BGMV shrink computed early, by the op that makes the layer's input (``fused.rms_norm``,
    ``fused.silu_and_mul``: one launch fewer per LoRA layer): h[t] = lora_a[s] @ x[t] per token t of
    slot s = token_slots[t] >= 0, over the producer's output x as stored. The producer sets ``h``
    ([P, T, N] float32 partial sums, or [T, N]; base rows undefined); the layer's expand reads it."""

    lora_a: Tensor  # [S, N, H_in]
    token_slots: Tensor  # [>=T] int32
    h: Tensor | None = None

    def run(self, x: Tensor, backend: Backend = "auto") -> Tensor:
        """The producer's part on a path without a fused kernel (the torch twins): shrink x now."""
        self.h = _ops(x, backend).bgmv_shrink(x, self.lora_a, self.token_slots)
        return self.h


def _host_slots(token_slots: Sequence[int] | Tensor | np.ndarray) -> np.ndarray:
    if isinstance(token_slots, Tensor):
        return token_slots.detach().to("cpu", torch.int32).numpy().ravel()
    return np.asarray(token_slots, dtype=np.int32).ravel()


def default_partials(num_tokens: int) -> int:
    p = PARTIALS
    while p > 1 and num_tokens > PARTIALS_MAX_TOKENS * (PARTIALS // p):
        p //= 2
    return p


def lora_buffer(num_tokens: int, lora_a: Tensor, partials: int | None = None) -> Tensor:
    """Float32 shrink scratch for add_lora: [P, T, n*R] for up to P partial sums over H_in (P =
    default_partials(T) unless given), or [T, n*R] (partials=0: no split-K).

    Preallocate one per layer shape and batch size for CUDA graphs; contents need no initialising.
    """
    if partials is None:
        partials = default_partials(num_tokens)
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


def _sgmv_tiles(meta: LoRABatchMeta, lora_a: Tensor, rank: int) -> LoRATiles:
    return meta.tiles(meta.plan_for(rank).block_m, lora_a.shape[0])


def sgmv_shrink(x: Tensor, lora_a: Tensor, meta: LoRABatchMeta, buf: Tensor | None = None,
                backend: Backend = "auto", rank: int = DEFAULT_RANK) -> Tensor:
    """Tiled segment shrink. x [T, H_in], lora_a [S, N, H_in], buf [P, T, N] or [T, N] float32
    (optional, preallocated). Returns h = buf[:p] (p partial sums over H_in, h.sum(0) the result) or
    buf; rows of base tokens are left as they were. Tiles: meta.tiles(plan block_m) (lora_plan).

    for slot, first, end, _ in tiles.table:       # every tile: rows of one slot
        rows = tiles.rows[first:end]
        h.sum(0)[rows] = x[rows].float() @ lora_a[slot].float().T
    return h
    """
    return _ops(x, backend).sgmv_shrink(x, lora_a, _sgmv_tiles(meta, lora_a, rank), buf=buf)


def bgmv_shrink(x: Tensor, lora_a: Tensor, meta: LoRABatchMeta, buf: Tensor | None = None,
                backend: Backend = "auto") -> Tensor:
    """Per-token shrink. x [T, H_in], lora_a [S, N, H_in], buf [P, T, N] or [T, N] float32 (optional).
    Returns h as sgmv_shrink does.

    for t in range(T):
        s = meta.token_slots[t]
        if s >= 0:
            h.sum(0)[t] = lora_a[s].float() @ x[t].float()
    return h
    """
    return _ops(x, backend).bgmv_shrink(x, lora_a, meta.token_slots, buf=buf)


def sgmv_expand(y: Tensor, h: Tensor, lora_b: Tensor, scales: Tensor, out_slices: Sequence[int],
                meta: LoRABatchMeta, backend: Backend = "auto") -> None:
    """Tiled segment expand, every slice in one launch. y [T, O] (in place), h [T, n*R] or [p, T, n*R]
    float32 (partials, summed on load), lora_b [S, O, R], scales [S] float32, out_slices: n ints summing to O.

    for slot, first, end, _ in tiles.table:
        rows = tiles.rows[first:end]
        for i, out in enumerate(out_slices):      # off = sum(out_slices[:i])
            y[rows, off:off+out] += scales[slot] * h.sum(0)[rows, i*R:(i+1)*R] @ lora_b[slot, off:off+out].float().T
    """
    tiles = meta.tiles(meta.plan_for(lora_b.shape[2]).block_m, lora_b.shape[0])
    _ops(y, backend).sgmv_expand(y, h, lora_b, scales, out_slices, tiles)


def bgmv_expand(y: Tensor, h: Tensor, lora_b: Tensor, scales: Tensor, out_slices: Sequence[int],
                meta: LoRABatchMeta, backend: Backend = "auto") -> None:
    """Per-token expand, every slice in one launch. y [T, O] (in place), h [T, n*R] or [p, T, n*R]
    float32 (partials, summed on load), lora_b [S, O, R], scales [S] float32, out_slices: n ints summing to O.

    for t in range(T):
        s = meta.token_slots[t]
        for i, out in enumerate(out_slices):      # off = sum(out_slices[:i])
            if s >= 0:
                y[t, off:off+out] += scales[s] * lora_b[s, off:off+out].float() @ h.sum(0)[t, i*R:(i+1)*R]
    """
    _ops(y, backend).bgmv_expand(y, h, lora_b, scales, out_slices, meta.token_slots)


def use_bgmv(meta: LoRABatchMeta, kind: Kind = "auto", rank: int = DEFAULT_RANK) -> bool:
    """BGMV when asked, or in auto mode when the plan for this batch shape and rank says so."""
    if kind not in ("auto", "sgmv", "bgmv"):
        raise ValueError(f"kind must be 'auto', 'sgmv' or 'bgmv', got {kind!r}")
    return kind == "bgmv" or (kind == "auto" and meta.plan_for(rank).kind == "bgmv")


def add_lora(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
             out_slices: Sequence[int], meta: LoRABatchMeta, *, buf: Tensor | None = None,
             backend: Backend = "auto", kind: Kind = "auto", fused: bool = False) -> None:
    """In place, one shrink and one expand for all n slices of a fused layer (fused: one launch for
    both, see fused_lora; buf is then unused).

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
    tiles = route(meta, lora_a, lora_b.shape[2], kind)
    if fused:
        fused_lora(y, x, lora_a, lora_b, scales, out_slices, meta, tiles, backend)
        return
    h = shrink(x, lora_a, meta, tiles, buf, backend)
    expand(y, h, lora_b, scales, out_slices, meta, tiles, backend)


def route(meta: LoRABatchMeta, lora_a: Tensor, rank: int, kind: Kind = "auto") -> LoRATiles | None:
    """The path of add_lora's two halves: None for BGMV, else SGMV's tile table (made now, on the
    current stream, so shrink and expand may run on others)."""
    return None if use_bgmv(meta, kind, rank) else _sgmv_tiles(meta, lora_a, rank)


def shrink(x: Tensor, lora_a: Tensor, meta: LoRABatchMeta, tiles: LoRATiles | None, buf: Tensor | None = None,
           backend: Backend = "auto") -> Tensor:
    """add_lora's first half on the route's path: h float32 (see sgmv_shrink); buf from lora_buffer or None."""
    if buf is None:
        buf = lora_buffer(x.shape[0], lora_a)
    ops = _ops(x, backend)
    if tiles is None:
        return ops.bgmv_shrink(x, lora_a, meta.token_slots, buf=buf)
    return ops.sgmv_shrink(x, lora_a, tiles, buf=buf)


def expand(y: Tensor, h: Tensor, lora_b: Tensor, scales: Tensor, out_slices: Sequence[int], meta: LoRABatchMeta,
           tiles: LoRATiles | None, backend: Backend = "auto") -> None:
    """add_lora's second half: y += the LoRA delta of h (from shrink on the same route)."""
    ops = _ops(y, backend)
    if tiles is None:
        ops.bgmv_expand(y, h, lora_b, scales, out_slices, meta.token_slots)
    else:
        ops.sgmv_expand(y, h, lora_b, scales, out_slices, tiles)


def fused_lora(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor, out_slices: Sequence[int],
               meta: LoRABatchMeta, tiles: LoRATiles | None, backend: Backend = "auto") -> None:
    """add_lora in one launch on the route's path (tiles None: BGMV): each program computes the h of
    its rows and slice in registers and adds it into a chunk of y's columns (lora_triton: the chunk rule).

    for t in range(T):
        s = meta.token_slots[t]
        for i, out in enumerate(out_slices):      # off = sum(out_slices[:i])
            if s >= 0:
                h = scales[s] * lora_a[s, i*R:(i+1)*R].float() @ x[t].float()
                y[t, off:off+out] += lora_b[s, off:off+out].float() @ h
    """
    ops = _ops(y, backend)
    if tiles is None:
        ops.bgmv_lora(y, x, lora_a, lora_b, scales, out_slices, meta.token_slots)
    else:
        ops.sgmv_lora(y, x, lora_a, lora_b, scales, out_slices, tiles)


def warmup(lora_a: Tensor, lora_b: Tensor, scales: Tensor, out_slices: Sequence[int],
           backend: Backend = "auto", fused: bool | None = None) -> None:
    """Compiles every kernel variant add_lora can pick for this layer shape (BGMV, and SGMV at each
    tile size of lora_plan.BLOCK_MS; the two-kernel path, the fused one, or both when ``fused`` is None),
    on a few dummy rows. The kernels take no batch-dependent integer that Triton would specialise on, so
    no batch seen later compiles anything new."""
    t = 2 * max(lora_plan.BLOCK_MS)
    x = torch.zeros(t, lora_a.shape[2], dtype=lora_a.dtype, device=lora_a.device)
    y = torch.zeros(t, lora_b.shape[1], dtype=lora_a.dtype, device=lora_a.device)
    slots = torch.zeros(t, dtype=torch.int32, device=lora_a.device)
    plans = [LoRAPlan("bgmv", 16)] + [LoRAPlan("sgmv", b) for b in lora_plan.BLOCK_MS]
    for p in plans:
        meta = LoRABatchMeta.build(slots, slots.device)  # tiles on the weights' device, as in serving
        meta.plan = p
        meta.token_slots = slots
        for f in (False, True) if fused is None else (fused,):
            add_lora(y, x, lora_a, lora_b, scales, out_slices, meta, backend=backend, fused=f)
