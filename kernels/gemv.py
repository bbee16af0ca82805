"""Skinny linear layers (decode: few rows of x against a large weight): public API, torch twin,
config table and device dispatch.

``skinny_linear`` computes ``F.linear(x, w, bias)`` with a Triton kernel (``gemv_triton``) that
streams W at near-HBM speed where cuBLAS does not for a few rows. ``backend="auto"`` takes the
kernel only for CUDA tensors whose (row bucket, N, K, dtype size) the measured table
``gemv_configs.json`` marks as faster than cuBLAS on this GPU model, inside CUDA graphs and eagerly
as measured apart (Triton's launch costs more host time), and ``F.linear`` otherwise (always on
CPU, so CPU numerics do not move). ``bench/gemv_sweep.py --write-table`` fills the
table on a GPU; the kernel never autotunes at serving time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

Backend = Literal["auto", "triton", "torch"]
Mode = Literal["fma", "dot", "dot_swap"]

TABLE_PATH = Path(__file__).with_name("gemv_configs.json")
M_BUCKETS = (1, 2, 4, 8, 16, 32)  # rows of x are padded to one of these; above the last, cuBLAS
MAX_M = M_BUCKETS[-1]


@dataclass(frozen=True)
class GemvConfig:
    """One launch shape of the kernel (see gemv_triton for the modes)."""

    block_m: int  # rows of x per program; >= 16 for the dot modes
    block_n: int  # rows of W (output columns) per program; >= 16 for the dot modes
    block_k: int  # K per tile, a power of two >= 16
    split_k: int = 1  # K ranges reduced by a second launch
    reduce: Literal["partials", "atomic"] = "partials"
    mode: Mode = "fma"
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {v}")
        if self.mode not in ("fma", "dot", "dot_swap"):
            raise ValueError(f"GemvConfig.mode must be fma, dot or dot_swap, got {self.mode!r}")
        if self.mode != "fma" and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"dot modes need block_m, block_n, block_k >= 16, got {self}")
        if self.block_k < 16 or self.split_k < 1:
            raise ValueError(f"GemvConfig needs block_k >= 16 and split_k >= 1, got {self}")
        if self.reduce not in ("partials", "atomic"):
            raise ValueError(f"GemvConfig.reduce must be partials or atomic, got {self.reduce!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_BUCKET_OF = [next(b for b in M_BUCKETS if b >= m) for m in range(MAX_M + 1)]


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (m <= MAX_M)."""
    return _BUCKET_OF[m]


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                  out: torch.Tensor | None = None, backend: Backend = "auto",
                  config: GemvConfig | None = None) -> torch.Tensor:
    """y = x @ w.T (+ bias), like ``F.linear``; with ``out``, written into it and returned.

    x: [..., K]; w: [N, K] (nn.Linear layout, contiguous along K); bias: [N] or None;
    out: [M, N] (last dim contiguous; its dtype is the result's), M = x.numel() // K.
    auto: the Triton kernel where the table says it beats cuBLAS for this shape on this GPU, else
    F.linear; triton: the kernel with ``config`` or the table's or a default one; torch: the float32
    twin (float32 math, one rounding to x's dtype).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if backend == "torch":
        y = skinny_linear_torch(x2, w, bias)
        y = y if out is None else out.copy_(y)
    else:
        if config is None and backend == "auto":
            config = auto_config(x2, w)
        elif config is None:
            config = table_config(x2, w) or default_config(x2.shape[0], w.shape[0], x2.shape[1])
        y = _cublas(x2, w, bias, out) if config is None else _triton(x2, w, bias, out, config)
    return y if out is not None else y.view(*x.shape[:-1], y.shape[-1])


def skinny_linear_torch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 twin: x [M, K], w [N, K] -> (x.float() @ w.float().T + bias.float()).to(x.dtype)."""
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _cublas(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return F.linear(x, w, bias)
    if bias is None:
        return torch.matmul(x, w.t(), out=out)
    return torch.addmm(bias, x, w.t(), out=out)  # what F.linear does: bias added before the rounding


def _triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
            config: GemvConfig) -> torch.Tensor:
    from . import gemv_triton

    m, k = x.shape
    n = w.shape[0]
    if x.dtype != w.dtype or (bias is not None and bias.stride(0) != 1):
        raise ValueError(f"skinny_linear needs x and w of one dtype and a contiguous bias, got {x.dtype}, {w.dtype}")
    if w.stride(1) != 1:
        w = w.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    if y.shape != (m, n) or y.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] and contiguous along its last dim, got {tuple(y.shape)}")
    if m == 0 or n == 0:
        return y
    if k == 0:
        y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
        return y
    gemv_triton.gemv(x, w, bias, y, config)
    return y


def warm_up(weights: Iterable[torch.Tensor]) -> int:
    """Compiles and loads, before serving, every kernel that auto dispatch may launch for these
    weights [N, K] (each row bucket whose table entry takes the kernel, in graphs or eagerly), so no
    request waits for Triton's compiler and no CUDA-graph capture meets a first launch. Returns the
    number of launches."""
    seen, launches = set(), 0
    for w in weights:
        key = (tuple(w.shape), w.dtype, w.device)
        if w.device.type != "cuda" or w.dim() != 2 or key in seen:
            continue
        seen.add(key)
        for m in M_BUCKETS:
            x = torch.zeros((m, w.shape[1]), dtype=w.dtype, device=w.device)
            entry = _entry(x, w)
            if entry is not None and (entry.in_graphs or entry.eager):
                skinny_linear(x, w, backend="triton", config=entry.config)
                launches += 1
    return launches


# ---- configs


class Entry(NamedTuple):
    config: GemvConfig  # the fastest config measured for this shape
    in_graphs: bool  # it beat cuBLAS inside a CUDA graph (how decode runs)
    eager: bool  # it beat cuBLAS launched eagerly, host launch overhead included


def auto_config(x: torch.Tensor, w: torch.Tensor) -> GemvConfig | None:
    """The table's config where the kernel beat cuBLAS for this shape on this GPU model, in the
    way it is launched now (captured in a CUDA graph, or eagerly); else None (F.linear)."""
    entry = _entry(x, w) if x.dtype == w.dtype else None
    if entry is None:
        return None
    won = entry.in_graphs if torch.cuda.is_current_stream_capturing() else entry.eager
    return entry.config if won else None


def table_config(x: torch.Tensor, w: torch.Tensor) -> GemvConfig | None:
    """The table's best config for this shape (whether or not it beat cuBLAS), or None."""
    entry = _entry(x, w)
    return entry.config if entry is not None else None


def _entry(x: torch.Tensor, w: torch.Tensor) -> Entry | None:
    if x.device.type != "cuda" or x.shape[0] > MAX_M or x.shape[0] == 0:
        return None
    return _device_table(x.device.index or 0).get((m_bucket(x.shape[0]), w.shape[0], x.shape[1], w.element_size()))


@cache
def _device_table(index: int) -> dict[tuple[int, int, int, int], Entry]:
    """(m bucket, N, K, dtype bytes) -> entry measured on this device's GPU model."""
    return parse_table(load_table(), torch.cuda.get_device_name(index))


def load_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    if not path.exists():
        return {"devices": {}}
    with open(path) as f:
        return json.load(f)


def parse_table(table: dict[str, Any], device_name: str) -> dict[tuple[int, int, int, int], Entry]:
    entries = table.get("devices", {}).get(device_name, {}).get("entries", [])
    return {(e["m"], e["n"], e["k"], e["dtype_bytes"]):
            Entry(GemvConfig(**e["config"]), bool(e["use"]), bool(e.get("use_eager", e["use"]))) for e in entries}


def default_config(m: int, n: int, k: int, num_sms: int = 132) -> GemvConfig:
    """A reasonable config without a table: CUDA-core GEMV up to 4 rows, tensor cores above;
    split-K (ranges of at least 64) until there are about two programs per SM."""
    bm = m_bucket(min(max(m, 1), MAX_M))
    if bm <= 4:
        bn, bk_max, mode, stages = (8 if bm == 1 else 4), 512, "fma", 1
    else:
        bm, bn, bk_max, mode, stages = max(16, bm), 32, 128, "dot", 3
    split = 1
    while -(-n // bn) * split < 2 * num_sms and k >= 2 * split * 64:
        split *= 2
    bk = min(bk_max, max(16, 1 << (max(-(-k // split), 1) - 1).bit_length()))
    return GemvConfig(bm, bn, bk, split_k=split, mode=mode, num_warps=4, num_stages=stages)  # type: ignore[arg-type]
