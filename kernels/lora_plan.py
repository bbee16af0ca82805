"""How a batch's LoRA rows are cut into kernel work: the plan (BGMV or tiled SGMV, tile rows) and
the SGMV tile table, built once per step from the token -> slot map.

Tokens that use an adapter are grouped by slot (a stable sort, so a request's tokens stay in
order); each group is cut into tiles of at most ``block_m`` rows. A long single-slot segment
becomes many tiles (many programs); base rows (slot -1) are in no tile and cost no work.

    rows  [L] int32        token index of each LoRA row, grouped by slot; L = tokens with slot >= 0
    table [num_tiles, 4]   int32 (slot, first, end, 0): tile covers rows[first:end], all of slot `slot`;
                           slot -1 marks an unused entry (device-built tables are sized for the worst case)

The host builder (numpy) serves eager steps; the device builder (torch ops, fixed sizes, no
host sync) serves batches whose slots live only on the device, e.g. inside CUDA graph capture.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

PlanKind = Literal["bgmv", "sgmv"]

BLOCK_MS = (16, 32, 64)  # tile rows the plan picks from (tl.dot needs >= 16)
# SGMV pays once it has this many rows per distinct adapter on average: below, BGMV's per-token
# reads of A and B (from L2 when tokens share an adapter) cost less than a mostly empty tile.
SGMV_MIN_ROWS = {16: 4, 32: 3}  # max rank -> rows per slot; larger ranks: 2


@dataclass(frozen=True)
class LoRAPlan:
    kind: PlanKind
    block_m: int  # rows per SGMV tile (also set for BGMV plans: the tile size SGMV would use)


@functools.lru_cache(maxsize=4096)
def plan(num_tokens: int, num_slots: int | None, rank: int = 16, lora_tokens: int | None = None) -> LoRAPlan:
    """BGMV (one program row per token) or tiled SGMV, and SGMV's tile rows, from the batch's shape.

    num_tokens: T in the batch; num_slots: distinct adapters among them (None = unknown, planned as
    one per token: a captured decode graph); rank: the slot stack's max rank R; lora_tokens: tokens
    with an adapter (default T). Rows per adapter = lora_tokens / num_slots decides both.
    """
    lora = num_tokens if lora_tokens is None else lora_tokens
    slots = max(1, lora if num_slots is None else num_slots)
    per_slot = lora / slots
    block_m = next((b for b in BLOCK_MS if per_slot <= b), BLOCK_MS[-1])
    min_rows = next((v for r, v in SGMV_MIN_ROWS.items() if rank <= r), 2)
    return LoRAPlan("sgmv" if per_slot >= min_rows else "bgmv", block_m)


@dataclass
class LoRATiles:
    """An SGMV tile table (module docstring) on the device."""

    rows: Tensor  # [L] int32
    table: Tensor  # [num_tiles, 4] int32
    num_tiles: int  # launch size: exact for host-built tables, a worst-case bound for device-built ones
    block_m: int


def max_tiles(num_tokens: int, num_slots: int, block_m: int) -> int:
    """Upper bound of tiles: sum over slots of ceil(n_s / block_m) <= ceil(T / block_m) + slots - 1, and <= T."""
    if num_tokens == 0:
        return 0
    return min(num_tokens, -(-num_tokens // block_m) + min(num_slots, num_tokens) - 1)


# ---- host (numpy), once per eager step

def host_segments(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seg_starts [G+1], seg_slots [G]) int32 of the maximal runs of equal slots."""
    t = len(slots)
    if t == 0:
        return np.zeros(1, np.int32), np.zeros(0, np.int32)
    starts = np.flatnonzero(slots[1:] != slots[:-1]).astype(np.int32) + 1
    starts = np.concatenate([[0], starts, [t]]).astype(np.int32)
    return starts, slots[starts[:-1]]


def group_rows(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, their slots): tokens with slot >= 0, grouped by slot (stable)."""
    idx = np.flatnonzero(slots >= 0)
    rows = idx[np.argsort(slots[idx], kind="stable")]
    return rows.astype(np.int32), slots[rows]


def count_groups(sorted_slots: np.ndarray) -> int:
    return int(len(sorted_slots) and 1 + np.count_nonzero(sorted_slots[1:] != sorted_slots[:-1]))


def host_table(sorted_slots: np.ndarray, block_m: int) -> np.ndarray:
    """[num_tiles, 4] int32 tile table of rows grouped by slot (``group_rows``)."""
    n = len(sorted_slots)
    if n == 0:
        return np.zeros((0, 4), np.int32)
    starts = np.flatnonzero(np.concatenate([[True], sorted_slots[1:] != sorted_slots[:-1]]))
    ends = np.append(starts[1:], n)
    per = -(-(ends - starts) // block_m)
    group = np.repeat(np.arange(len(starts)), per)
    k = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)
    first = starts[group] + k * block_m
    end = np.minimum(first + block_m, ends[group])
    return np.stack([sorted_slots[first], first, end, np.zeros_like(first)], axis=1).astype(np.int32)


def upload(parts: list[np.ndarray], device: torch.device | str | None) -> list[Tensor]:
    """int32 arrays to the device in one copy; each view starts 64-byte aligned (Triton specialises
    pointers on 16-byte alignment, so a shifting offset would compile new variants)."""
    sizes = [p.size for p in parts]
    offsets = np.cumsum([0] + [-(-s // 16) * 16 for s in sizes])
    flat = np.zeros(int(offsets[-1]), np.int32)
    for p, off in zip(parts, offsets, strict=False):
        flat[off:off + p.size] = p.ravel()
    dev = torch.from_numpy(flat).to(device, non_blocking=True) if device is not None else torch.from_numpy(flat)
    return [dev[off:off + s] for off, s in zip(offsets, sizes, strict=False)]


def host_tiles(rows: np.ndarray, sorted_slots: np.ndarray, block_m: int,
               device: torch.device | str | None) -> LoRATiles:
    table = host_table(sorted_slots, block_m)
    dev_rows, dev_table = upload([rows, table], device)
    return LoRATiles(dev_rows, dev_table.view(-1, 4), len(table), block_m)


# ---- device (torch ops, fixed sizes, no host sync: can be captured in a CUDA graph)

def device_tiles(token_slots: Tensor, block_m: int, num_slots: int) -> LoRATiles:
    """The tile table of ``token_slots`` [T] int32 (-1 = base row), built on its device.

    num_slots: S, slots that exist (ids < S); the table has max_tiles(T, S, block_m) entries, unused
    ones all -1. No sort (CUB's sorts are not reliably capturable): a token's place is its slot's
    start plus the count of earlier tokens of that slot, from a [T, S+1] one-hot cumsum.
    """
    t, dev = token_slots.numel(), token_slots.device
    cap = max_tiles(t, num_slots, block_m)
    key = torch.where(token_slots >= 0, token_slots, num_slots).long()  # base rows: class S, placed last
    onehot = key[:, None] == torch.arange(num_slots + 1, device=dev)[None, :]
    counts = onehot.sum(0)
    starts = torch.cumsum(counts, 0) - counts
    rank = onehot.cumsum(0).gather(1, key[:, None]).squeeze(1) - 1
    rows = torch.empty(t, dtype=torch.int32, device=dev)
    rows.scatter_(0, starts[key] + rank, torch.arange(t, dtype=torch.int32, device=dev))
    per = (counts[:num_slots] + block_m - 1) // block_m  # tiles of each slot
    ends = torch.cumsum(per, 0)
    i = torch.arange(cap, device=dev)
    slot = torch.searchsorted(ends, i, right=True)  # == S past the last tile
    s = slot.clamp(max=num_slots - 1)
    first = starts[s] + (i - ends[s] + per[s]) * block_m
    entry = torch.stack([slot, first, torch.minimum(first + block_m, starts[s] + counts[s]), torch.zeros_like(i)], 1)
    table = torch.where((slot < num_slots)[:, None], entry, -1).to(torch.int32)
    return LoRATiles(rows, table, cap, block_m)
