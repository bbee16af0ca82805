"""Skinny GEMM (kernels/gemv): the Triton kernel in every mode against its float32 twin, at small
shapes whose N and K are not multiples of the blocks, with split-K on and off; the dispatch and
the config table. On a machine without CUDA the kernel runs in Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py). test_gemv_gpu.py reuses the helpers at real shapes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels.gemv import (
    GemvConfig,
    auto_config,
    default_config,
    m_bucket,
    parse_table,
    skinny_linear,
    skinny_linear_torch,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# float32: summation order only. 16-bit: both sides round one float32 sum once; the interpreter
# truncates bf16, so one unit in the last place apart (outputs are about N(0, 1)).
TOLS = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2)}

CONFIGS = {  # name: config; K tiles of 16 or 32 so that small K still has several tiles per split
    "fma-m1": GemvConfig(1, 8, 32),
    "fma-m1-split3": GemvConfig(1, 4, 16, split_k=3),
    "fma-m4-split2-atomic": GemvConfig(4, 4, 32, split_k=2, reduce="atomic"),
    "fma-m16": GemvConfig(16, 2, 16, num_warps=2),
    "dot": GemvConfig(16, 16, 32, mode="dot", num_stages=2),
    "dot-split2": GemvConfig(16, 16, 16, split_k=2, mode="dot"),
    "dot-swap-split4-atomic": GemvConfig(16, 32, 16, split_k=4, reduce="atomic", mode="dot_swap"),
}


def rand(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, device: str = DEVICE) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(device)


def operands(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, device: str = DEVICE
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = rand(m, k, dtype=dtype, seed=m * 7 + k, device=device)
    w = rand(n, k, dtype=dtype, seed=n * 13 + k, scale=k ** -0.5, device=device)
    b = rand(n, dtype=dtype, seed=n, device=device) if bias else None
    return x, w, b


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    atol, rtol = TOLS[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def check(m: int, n: int, k: int, dtype: torch.dtype, config: GemvConfig | None, bias: bool = False,
          device: str = DEVICE) -> None:
    x, w, b = operands(m, n, k, dtype, bias, device)
    want = skinny_linear_torch(x, w, b)
    close(skinny_linear(x, w, b, backend="triton", config=config), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_modes_and_splits_match_the_twin(name, dtype):
    for m in (1, 3, 16):
        check(m, 37, 100, dtype, CONFIGS[name], bias=m == 3)


@pytest.mark.parametrize("m", list(range(1, 17)))
def test_every_row_count_with_the_default_config(m):
    """Rows 1..16, bf16, the config skinny_linear picks without a table (split-K where N is small)."""
    check(m, 45, 200, torch.bfloat16, None)
    assert default_config(m, 45, 200).split_k > 1


@pytest.mark.parametrize(("n", "k"), [(1, 16), (5, 17), (33, 31), (64, 512), (130, 48)])
def test_odd_shapes(n, k):
    for config in (None, CONFIGS["fma-m1-split3"], CONFIGS["dot-split2"]):
        check(2, n, k, torch.float32, config, bias=True)


def test_splits_past_the_end_of_k_are_empty():
    """K = 40 in 8 splits of one 16-wide tile: the last splits start past K and add nothing."""
    for reduce in ("partials", "atomic"):
        check(3, 20, 40, torch.float32, GemvConfig(4, 4, 16, split_k=8, reduce=reduce))  # type: ignore[arg-type]


def test_out_strided_rows_and_3d_input():
    x, w, b = operands(6, 40, 64, torch.float32, bias=True)
    buf = torch.full((6, 50), 7.0, device=DEVICE)
    out = buf[:, :40]  # rows of stride 50, like a slice of a larger logits buffer
    got = skinny_linear(x, w, b, out=out, backend="triton", config=CONFIGS["fma-m4-split2-atomic"])
    assert got.data_ptr() == out.data_ptr()
    close(buf[:, :40], skinny_linear_torch(x, w, b))
    assert bool((buf[:, 40:] == 7.0).all())
    y = skinny_linear(x.view(2, 3, 64), w, b, backend="triton")
    assert y.shape == (2, 3, 40)
    close(y.view(6, 40), skinny_linear_torch(x, w, b))


def test_auto_on_cpu_is_f_linear_exactly():
    x, w, b = operands(3, 40, 64, torch.bfloat16, bias=True, device="cpu")
    assert auto_config(x, w) is None
    assert torch.equal(skinny_linear(x, w, b), F.linear(x, w, b))
    out = torch.empty(3, 40, dtype=torch.bfloat16)
    assert torch.equal(skinny_linear(x, w, b, out=out), F.linear(x, w, b))


def test_empty_and_k0():
    x, w, _ = operands(1, 8, 16, torch.float32, bias=False)
    assert skinny_linear(x[:0], w, backend="triton").shape == (0, 8)
    b = rand(8, dtype=torch.float32, seed=3)
    y = skinny_linear(x[:, :0], w[:, :0], b, backend="triton")
    assert torch.equal(y, b.expand(1, 8))


def test_bad_arguments():
    x, w, _ = operands(2, 8, 16, torch.float32, bias=False)
    with pytest.raises(ValueError, match="backend"):
        skinny_linear(x, w, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one dtype"):
        skinny_linear(x, w.half(), backend="triton")
    with pytest.raises(ValueError, match="out must be"):
        skinny_linear(x, w, out=torch.empty(2, 9, device=DEVICE), backend="triton")
    for bad in (dict(block_n=3), dict(mode="dot", block_n=8), dict(reduce="sum"), dict(mode="gemm")):
        with pytest.raises(ValueError, match="GemvConfig"):
            GemvConfig(**{**dict(block_m=16, block_n=16, block_k=16), **bad})  # type: ignore[arg-type]


def test_table_parsing_and_buckets(tmp_path):
    cfg = GemvConfig(1, 8, 512, split_k=2)
    table = {"devices": {"GPU A": {"entries": [
        dict(m=1, n=4096, k=1024, dtype_bytes=2, use=True, config=cfg.to_json()),
        dict(m=2, n=4096, k=1024, dtype_bytes=2, use=True, use_eager=False, config=cfg.to_json()),
        dict(m=4, n=4096, k=1024, dtype_bytes=2, use=False, config=GemvConfig(4, 4, 256).to_json()),
    ]}}}
    (tmp_path / "t.json").write_text(json.dumps(table))
    parsed = parse_table(json.loads((tmp_path / "t.json").read_text()), "GPU A")
    assert parsed[(1, 4096, 1024, 2)] == (cfg, True, True)  # use_eager defaults to use
    assert parsed[(2, 4096, 1024, 2)] == (cfg, True, False)
    assert parsed[(4, 4096, 1024, 2)][1:] == (False, False)
    assert parse_table(table, "GPU B") == {}
    assert [m_bucket(m) for m in (1, 2, 3, 4, 5, 9, 17, 32)] == [1, 2, 4, 4, 8, 16, 32, 32]


def test_the_shipped_table_parses():
    from loraplex.kernels.gemv import load_table

    table = load_table()
    for name in table["devices"]:
        for key, (cfg, _use, _use_eager) in parse_table(table, name).items():
            assert key[0] in (1, 2, 4, 8, 16, 32) and cfg.block_m >= 1
