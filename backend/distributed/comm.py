"""The tensor-parallel process group of one worker process, and the two collectives the model uses.

Each worker calls ``init`` once; the sharded layers then call ``all_reduce`` (row-parallel
outputs, the vocab-parallel embedding) and ``all_gather_last`` (the vocab-parallel LM head).
With one rank (``world_size() == 1``) both are no-ops, so unsharded code paths pay nothing.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int
    world_size: int


_GROUP = TPGroup(0, 1)


def init(rank: int, world_size: int, init_method: str, device: torch.device, timeout_s: float) -> None:
    """Joins the group: NCCL when ``device`` is CUDA, gloo otherwise."""
    global _GROUP
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)  # type: ignore[arg-type]
    _GROUP = TPGroup(rank, world_size)


def destroy() -> None:
    global _GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = TPGroup(0, 1)


def rank() -> int:
    return _GROUP.rank


def world_size() -> int:
    return _GROUP.world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums ``x`` over the ranks, in place; returns it."""
    if _GROUP.world_size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """[..., n] from each rank -> [..., world_size * n], rank order along the last dim."""
    if _GROUP.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_GROUP.world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)
