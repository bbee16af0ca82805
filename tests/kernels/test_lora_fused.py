"""Fused LoRA (shrink and expand in one launch, ``lora_triton.bgmv_lora``/``sgmv_lora``) against the
float32 torch references and against the unfused Triton pair.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
test_lora_kernels before triton is imported), at small shapes. The GPU file imports ``run_fused``
and ``check_fused`` from here.
"""

from __future__ import annotations

import pytest
import torch
from test_lora_kernels import (
    DEVICE,
    GUARD,
    TOLS,
    Case,
    add_lora,
    assert_close,
    expand,
    lora,
    lora_torch,
    lora_triton,
    make_case,
    naive_add_lora,
    shrink,
    token_slots,
)

KINDS = ["sgmv", "bgmv"]
FUSED_DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 tl.dot is wrong (lora_triton._half_dot)


def run_fused(case: Case, kind: str, ops, block_m: int = 16, col_iters: int | None = None) -> torch.Tensor:
    """y after the fused op on a fresh copy of case.y (a view left of NaN guard columns)."""
    y = case.fresh_y()
    args = (y, case.x, case.lora_a, case.lora_b, case.scales, case.out_slices)
    if kind == "sgmv":
        ops.sgmv_lora(*args, case.meta.tiles(block_m, case.lora_a.shape[0]), col_iters=col_iters)
    else:
        ops.bgmv_lora(*args, case.meta.token_slots, col_iters=col_iters)
    return y


def run_unfused(case: Case, kind: str, block_m: int = 16) -> torch.Tensor:
    """y after the Triton shrink then expand."""
    y = case.fresh_y()
    h = shrink(case, kind, lora_triton, lora.lora_buffer(case.x.shape[0], case.lora_a), block_m)
    expand(case, kind, lora_triton, y, h, block_m)
    return y


def check_fused(case: Case, y: torch.Tensor, expected: torch.Tensor) -> None:
    """y against expected (float), base rows bit-equal to case.y, guard columns still NaN."""
    assert torch.isfinite(y).all()
    assert_close(y.float(), expected.float(), TOLS[y.dtype])
    base = case.meta.token_slots[:y.shape[0]] < 0
    assert torch.equal(y[base], case.y[base]), "base rows must stay untouched"
    guard = y.as_strided((y.shape[0], GUARD), (y.stride(0), 1), y.storage_offset() + y.shape[1])
    assert torch.isnan(guard).all(), "the fused op wrote past the last slice"


def reference(case: Case, kind: str) -> torch.Tensor:
    return run_fused(case, kind, lora_torch)


def mixed_case(dtype: torch.dtype, out_slices: list[int], seed: int = 0) -> Case:
    """Several slots, base rows between them, a rank-8 adapter in a rank-16 stack (zero-padded)."""
    slots = token_slots([2, -1, 0, 2, 1, -1, 3], [5, 2, 3, 1, 4, 1, 2])
    return make_case(slots, 4, [16, 8, 16, 16], 40, out_slices, dtype, seed=seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("out_slices", [[48], [24, 40], [32, 16, 40]], ids=["1", "2", "3"])
def test_fused_matches_reference_and_unfused(out_slices: list[int], dtype: torch.dtype, kind: str):
    case = mixed_case(dtype, out_slices)
    y = run_fused(case, kind, lora_triton)
    check_fused(case, y, reference(case, kind))
    check_fused(case, y, run_unfused(case, kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("col_iters", [1, 2, 64], ids=["1", "2", "all"])
def test_fused_column_chunks(kind: str, col_iters: int, monkeypatch: pytest.MonkeyPatch):
    """Chunks of one column block, of two (the last one ragged), and one chunk per slice, over slices
    of 3 and 2 blocks of 128 columns (BGMV's tiles cut to 128 x 16; SGMV's blocks are 128 wide)."""
    monkeypatch.setattr(lora_triton, "BGMV_TILES", ((1 << 62, 128 * 16, 4),))
    case = make_case(token_slots([1, 0, -1, 1], [3, 2, 1, 2]), 2, [16, 8], 24, [300, 136], torch.float32, seed=2)
    y = run_fused(case, kind, lora_triton, col_iters=col_iters)
    check_fused(case, y, reference(case, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_small_tiles(kind: str, monkeypatch: pytest.MonkeyPatch):
    """Several K steps with a ragged last one (H_in 72 in steps of 16), and the BGMV's loads ahead
    over several 16-column blocks per program."""
    monkeypatch.setattr(lora_triton, "BGMV_TILES", ((1 << 62, 16 * 16, 4),))
    monkeypatch.setattr(lora_triton, "SGMV_BLOCK_K", 16)
    case = make_case(token_slots([1, -1, 0, 1], [2, 1, 3, 2]), 2, [16, 8], 72, [40, 24], torch.float16, seed=7)
    check_fused(case, run_fused(case, kind, lora_triton, col_iters=2), reference(case, kind))


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_fused_sgmv_tile_sizes(block_m: int):
    """Runs longer than a tile, ragged last tiles, base rows mixed in."""
    slots = token_slots([0, -1, 2, 0, 1], [40, 3, 17, 9, 1])
    case = make_case(slots, 3, [16, 8, 16], 36, [40, 24], torch.float16, seed=block_m)
    y = run_fused(case, "sgmv", lora_triton, block_m=block_m)
    check_fused(case, y, reference(case, "sgmv"))
    check_fused(case, y, run_unfused(case, "sgmv", block_m))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ranks", [[8, 8], [64, 16]], ids=["8", "64"])
def test_fused_ranks(kind: str, ranks: list[int]):
    """Rank below the BGMV floor of 16 rows of A (block_r 8) and above a single 16-row block."""
    case = make_case(token_slots([0, 1, -1, 0], [2, 3, 1, 2]), 2, ranks, 72, [32, 16], torch.float32, seed=3)
    check_fused(case, run_fused(case, kind, lora_triton), reference(case, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_empty_batch_and_only_base_rows(kind: str):
    for slots in ([], [-1, -1, -1]):
        case = make_case(slots, 2, [8, 8], 16, [16, 8], torch.float32, seed=4)
        y = run_fused(case, kind, lora_triton)
        assert torch.equal(y, case.y)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_lora_fused_equals_unfused(backend: str, kind: str):
    """Through the public API: add_lora(fused=True) against add_lora(fused=False) and the naive loop."""
    case = mixed_case(torch.float32, [32, 16, 16], seed=5)
    ys = []
    for fused in (False, True):
        y = case.fresh_y()
        add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.out_slices, case.meta,
                 backend=backend, kind=kind, fused=fused)  # type: ignore[arg-type]
        ys.append(y)
    check_fused(case, ys[1], ys[0])
    check_fused(case, ys[1], naive_add_lora(case))


def test_fused_lora_follows_route():
    """fused_lora on the route's tiles (SGMV) or None (BGMV), on device-only slots too."""
    case = mixed_case(torch.float32, [24, 40], seed=6)
    for meta in (case.meta, lora.LoRABatchMeta.on_device(case.meta.token_slots, lora.LoRAPlan("sgmv", 16))):
        for kind in KINDS:
            tiles = lora.route(meta, case.lora_a, case.lora_b.shape[2], kind)  # type: ignore[arg-type]
            assert (tiles is None) == (kind == "bgmv")
            y = case.fresh_y()
            lora.fused_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.out_slices, meta, tiles,
                            backend="triton")
            check_fused(case, y, naive_add_lora(case))


def test_chunk_rules():
    """BGMV: square tiles of 16k elements below H_in 4096, 32k from it, no wider than the widest slice
    or H_in. SGMV: columns per program grow with the row programs (tiles x slices), one block at
    least, a whole slice at most."""
    assert lora_triton._bgmv_blocks(16, 1024, 2048) == (16, 1024, 1024, 8)  # Qwen3-0.6B qkv
    assert lora_triton._bgmv_blocks(16, 14336, 4096) == (16, 2048, 2048, 16)  # Llama-3-8B down
    assert lora_triton._bgmv_blocks(8, 1024, 96) == (8, 128, 1024, 8)
    assert lora_triton._bgmv_blocks(64, 40, 1024) == (64, 256, 64, 8)
    dev = torch.device(DEVICE)
    sms = lora_triton._target_programs(dev) // lora_triton._PROGRAMS_PER_SM
    per_sm = lora_triton.SGMV_ROW_PROGRAMS_PER_SM
    assert lora_triton._sgmv_col_iters(24, 128, 3, 1024, dev, None) == 1
    assert lora_triton._sgmv_col_iters(24, 128, int(per_sm * sms), 1024, dev, None) == 1024 // 128
    assert lora_triton._sgmv_col_iters(24, 128, 100 * sms, 1024, dev, None) == 24
    assert lora_triton._sgmv_col_iters(24, 128, 3, 1024, dev, 5) == 5
