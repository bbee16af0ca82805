"""Triton paged attention and KV write against the torch references, at small shapes.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py); with CUDA they run natively at the same shapes. The reference is the torch
path in float32; every output row starts as NaN, so a row the kernel forgets shows up.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import check, make_step

from loraplex.kernels import attention
from loraplex.kernels.attention import write_kv

attention_triton = pytest.importorskip("loraplex.kernels.attention_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_triton(step, splits: int | None = None, qsl: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.full_like(step.q, float("nan"))
    return attention_triton.paged_attention(
        step.q, step.k_cache, step.v_cache, step.block_tables, step.seq_lens,
        step.query_start_loc if qsl is None else qsl, step.max_query_len, step.scale, step.window, out=out,
        splits=splits)


# (heads, kv_heads, head_dim, block_size, dtype): GQA 1/2/4/8 and MQA, every head dim, block sizes 1..128
DECODE_SHAPES = [
    (4, 4, 64, 16, torch.float32),
    (4, 2, 80, 4, torch.bfloat16),
    (8, 2, 96, 8, torch.float16),
    (8, 1, 128, 32, torch.float32),
    (16, 2, 64, 1, torch.bfloat16),
    (6, 1, 256, 128, torch.float32),
    (3, 3, 128, 2, torch.float16),
]


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "dtype"), DECODE_SHAPES)
def test_decode(heads, kv_heads, head_dim, block_size, dtype):
    step = make_step([1, 37, 200, 5], [1, 1, 1, 1], heads, kv_heads, head_dim, block_size, dtype,
                     seed=heads + head_dim, device=DEVICE)
    check(run_triton(step), step.reference(), dtype)


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
@pytest.mark.parametrize("window", [None, 40])
def test_decode_splits(splits, window):
    """Splits longer than some contexts leave empty partials; the merge must ignore them."""
    step = make_step([300, 3, 129, 64], [1, 1, 1, 1], 8, 2, 64, 16, window=window, seed=splits,
                     device=DEVICE, table_dtype=torch.int64, extra_blocks=2)
    check(run_triton(step, splits=splits), step.reference(), torch.float32)


def test_decode_padded_rows_and_empty_sequences():
    """Graph-bucket padding: rows of length 1 on a dummy block; a sequence with no query this step."""
    step = make_step([50, 1, 1, 20], [1, 1, 1, 1], 4, 2, 64, 8, device=DEVICE)
    step.block_tables[1:3] = 0  # both padding rows read block 0
    check(run_triton(step, splits=4), step.reference(), torch.float32)
    sub = make_step([50, 9, 20], [1, 0, 1], 4, 2, 64, 8, device=DEVICE)  # sequence 1 has no query
    check(run_triton(sub, splits=2), sub.reference(), torch.float32)
    check(run_triton(sub, splits=1), sub.reference(), torch.float32)


# seq_lens, query_lens: one prefill, prefill + decodes, chunked prefill over a cached prefix
MIXED = [
    ([13], [13]),
    ([40, 9, 1, 70], [40, 1, 1, 3]),
    ([90, 33, 17], [20, 33, 5]),
]


@pytest.mark.parametrize(("seq_lens", "query_lens"), MIXED)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "dtype"), [
    (4, 4, 64, 4, torch.float32),
    (8, 2, 80, 16, torch.bfloat16),
    (8, 1, 128, 1, torch.float16),
    (4, 1, 96, 32, torch.float32),
])
def test_prefill_and_mixed(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype):
    step = make_step(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, device=DEVICE,
                     seed=len(seq_lens))
    check(run_triton(step), step.reference(), dtype)


def test_prefill_head_dim_256_gqa_8():
    step = make_step([70, 20], [30, 20], 16, 2, 256, 16, torch.bfloat16, device=DEVICE)
    check(run_triton(step), step.reference(), torch.bfloat16)


@pytest.mark.parametrize("window", [1, 7, 64])
def test_prefill_sliding_window(window):
    step = make_step([90, 33, 12], [20, 33, 1], 4, 2, 64, 8, window=window, device=DEVICE, seed=window)
    check(run_triton(step), step.reference(), torch.float32)


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_public_api_dispatch(table_dtype):
    """backend='triton' through the public function (query_start_loc computed on the device)."""
    step = make_step([25, 8], [25, 2], 4, 2, 64, 8, device=DEVICE, table_dtype=table_dtype)
    check(step.run("triton"), step.reference(), torch.float32)
    check(step.run("triton", query_start_loc=step.query_start_loc), step.reference(), torch.float32)
    assert attention.use_triton(step.q, "auto") == (DEVICE == "cuda")
    with pytest.raises(ValueError, match="backend"):
        step.run("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv_skips_padding(dtype, slot_dtype):
    gen = torch.Generator().manual_seed(3)
    kv = torch.randn(2, 2, 6, 4, 3, 80, generator=gen).to(dtype).to(DEVICE)  # [L, 2, N, BS, Hkv, D]
    k = torch.randn(7, 3, 80, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(7, 3, 80, generator=gen).to(dtype).to(DEVICE)
    slots = torch.tensor([5, -1, 0, 23, -1, 12, 6], dtype=slot_dtype, device=DEVICE)
    expected = kv.clone()
    write_kv(k, v, expected[1, 0], expected[1, 1], slots, backend="torch")
    write_kv(k, v, kv[1, 0], kv[1, 1], slots, backend="triton")
    assert torch.equal(kv, expected)
    assert not torch.equal(kv[1, 0].view(-1, 3, 80)[5], torch.zeros(3, 80, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("window", [None, 30])
def test_mixed_step_with_split_decode_rows(monkeypatch, window):
    """Past MIXED_SPLIT_MIN_KV of table width, one-token rows of a mixed step take the split decode launch."""
    monkeypatch.setattr(attention_triton, "MIXED_SPLIT_MIN_KV", 64)
    monkeypatch.setattr(attention_triton, "MIN_SPLIT_TOKENS", 16)
    step = make_step([200, 1, 90, 7, 33], [1, 1, 40, 7, 1], 8, 2, 64, 16, window=window, device=DEVICE)
    check(run_triton(step), step.reference(), torch.float32)
    check(run_triton(step, splits=1), step.reference(), torch.float32)


def test_warm_up_runs_every_launch_kind(monkeypatch, tmp_path):
    """warm_up launches the decode (split and not), prefill, mixed long-table and tile-map kernels (interpreted
    on CPU: this checks the launches' arguments, the GPU test checks that nothing compiles later),
    with the index dtypes of the engine's own steps (a pointer's element type is part of a compiled
    variant's key, so an int32 warm-up would not serve int64 steps)."""
    from loraplex import LLM
    from loraplex.backend.layers import attention as layer_module
    from loraplex.kernels import attention_triton
    from tests.engine_factory import write_tiny_model

    launches: list[tuple[int, int, int]] = []
    warm_dtypes: set[tuple[torch.dtype, ...]] = set()
    real = attention_triton._launch

    def spy(*args):
        launches.append((*args[9:12], len(args) > 12 and args[12] is not None))  # (max_query_len, rows, splits, tiled)
        warm_dtypes.add((args[4].dtype, args[5].dtype, args[6].dtype))  # tables, seq_lens, query starts
        return real(*args)

    monkeypatch.setattr(attention_triton, "_launch", spy)
    k_cache = torch.randn(4, 16, 2, 32, device=DEVICE)
    attention_triton.warm_up(4, k_cache, torch.randn_like(k_cache), 32**-0.5, None)
    decode_all, multi, decode_rows = attention_triton.ALL_ROWS, attention_triton.MULTI_ROWS, attention_triton.DECODE_ROWS
    assert set(launches) == {(1, decode_all, 1, False), (1, decode_all, 2, False), (3, multi, 1, False),
                             (1, decode_rows, 1, False), (1, decode_rows, 2, False), (3, decode_all, 1, False),
                             (2, multi, 1, True)}

    step_dtypes: set[tuple[torch.dtype, ...]] = set()
    layer_call = layer_module.paged_attention

    def engine_spy(q, k_cache, v_cache, block_tables, seq_lens, *args, **kwargs):
        step_dtypes.add((block_tables.dtype, seq_lens.dtype, kwargs["query_start_loc"].dtype))
        return layer_call(q, k_cache, v_cache, block_tables, seq_lens, *args, **kwargs)

    monkeypatch.setattr(layer_module, "paged_attention", engine_spy)
    llm = LLM(str(write_tiny_model(tmp_path / "m")), dtype="float32", enable_lora=False)
    llm.generate([[1, 2, 3, 4, 5]], None)  # a prefill step and decode steps
    assert step_dtypes == warm_dtypes


def run_tiled(step, map_rows: int | None = None, splits: int | None = None) -> torch.Tensor:
    """The captured mixed step's launches: tile map for the multi-token rows, split launch for the rest."""
    import numpy as np

    heads, kv_heads, head_dim = step.q.shape[1], step.k_cache.shape[2], step.q.shape[2]
    block_q = attention_triton.prefill_block_q(heads, kv_heads, head_dim, step.q.dtype)
    rows = map_rows or attention_triton.max_tile_entries(step.q.shape[0], len(step.seq_lens), block_q)
    host = np.zeros((rows, 2), dtype=np.int32)
    attention_triton.fill_tile_map(step.query_lens.cpu().numpy(), block_q, host)
    out = torch.full_like(step.q, float("nan"))
    return attention_triton.paged_attention(
        step.q, step.k_cache, step.v_cache, step.block_tables, step.seq_lens, step.query_start_loc,
        10**6, step.scale, step.window, out=out, splits=splits, tiles=torch.from_numpy(host).to(step.q.device))


@pytest.mark.parametrize(("seq_lens", "query_lens"), [*MIXED, ([200, 1, 90, 7, 33], [1, 1, 40, 7, 1]),
                                                      ([5, 1, 1], [0, 1, 1])])
@pytest.mark.parametrize("window", [None, 30])
def test_tile_map_launch_matches_reference(seq_lens, query_lens, window):
    """A captured mixed step's attention (programs from the host's tile map, spare entries -1, one-token
    rows through the split launch, a sequence with no query) equals the reference."""
    step = make_step(seq_lens, query_lens, 8, 2, 64, 16, window=window, device=DEVICE, seed=len(seq_lens))
    expected = step.reference()
    check(run_tiled(step), expected, torch.float32)
    check(run_tiled(step, map_rows=64, splits=3), expected, torch.float32)


def test_fill_tile_map():
    import numpy as np

    out = np.zeros((8, 2), dtype=np.int32)
    assert attention_triton.fill_tile_map(np.array([1, 5, 0, 2, 1]), 4, out) == 3
    assert out.tolist() == [[1, 0], [1, 4], [3, 0], *[[-1, -1]] * 5]
    assert attention_triton.max_tile_entries(9, 5, 4) >= 3
    with pytest.raises(ValueError, match="do not fit"):
        attention_triton.fill_tile_map(np.array([40]), 4, out)
