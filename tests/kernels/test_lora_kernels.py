"""Triton SGMV/BGMV LoRA kernels against their float32 torch references.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1,
set before triton is imported); with CUDA they run natively at the same small shapes.
Two sweeps, as in Punica: how tokens spread over adapters (x dtype), then batch sizes and ranks;
then what tiles SGMV: one long single-adapter segment, ragged segments, base rows mixed in, tile
sizes, the plan, and tile tables built on the host and on the device. The GPU file imports the
case builders from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from loraplex.kernels import lora, lora_plan, lora_torch  # noqa: E402
from loraplex.kernels.lora import LoRABatchMeta, LoRAPlan, add_lora  # noqa: E402

lora_triton = pytest.importorskip("loraplex.kernels.lora_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# y after expand is rounded to its dtype once; the kernels differ from the reference by about 1 ulp.
TOLS = {  # (atol, rtol)
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
BUF_TOL = (1e-3, 1e-3)  # shrink accumulates exact products in float32 for every dtype
BLOCK_MS = list(lora_plan.BLOCK_MS)
DISTRIBUTIONS = ["distinct", "uniform", "zipf", "identical", "with_base"]
GUARD = 8  # NaN columns right of y: a write past the last slice shows up


@dataclass
class Case:
    """One fused layer's LoRA inputs: x [T, H_in] (a strided view), y_full [T, O + GUARD]."""

    x: torch.Tensor
    y_full: torch.Tensor  # y [T, O] is its left part; the GUARD columns on the right are NaN
    lora_a: torch.Tensor  # [S, n*R, H_in]
    lora_b: torch.Tensor  # [S, O, R]
    scales: torch.Tensor  # [S] float32
    ranks: list[int]  # [S] true rank of each slot
    out_slices: list[int]
    meta: LoRABatchMeta

    @property
    def y(self) -> torch.Tensor:
        return self.y_full[:, :sum(self.out_slices)]

    def fresh_y(self) -> torch.Tensor:
        """A copy of y that is again a strided view left of NaN guard columns."""
        return self.y_full.clone()[:, :sum(self.out_slices)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float]) -> None:
    torch.testing.assert_close(actual, expected, atol=tol[0], rtol=tol[1])


def request_slots(dist: str, num_requests: int, num_slots: int, gen: torch.Generator) -> list[int]:
    """One adapter slot per request (-1 = base model)."""
    if dist == "distinct":
        assert num_slots >= num_requests
        return torch.randperm(num_slots, generator=gen)[:num_requests].tolist()
    if dist == "identical":
        return [int(torch.randint(num_slots, (1,), generator=gen))] * num_requests
    if dist == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(weights, num_requests, replacement=True, generator=gen).tolist()
    slots = torch.randint(num_slots, (num_requests,), generator=gen)
    if dist == "with_base":
        slots[torch.rand(num_requests, generator=gen) < 0.4] = -1
    return slots.tolist()


def token_slots(req_slots: list[int], lengths: list[int]) -> list[int]:
    return [s for s, n in zip(req_slots, lengths, strict=True) for _ in range(n)]


def make_weights(num_slots: int, max_rank: int, ranks: list[int], h_in: int, out_slices: list[int],
                 dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Stacked, zero-padded lora_a [S, n*R, H_in], lora_b [S, O, R], scales [S]."""
    n, r = len(out_slices), max_rank
    rank_of = torch.tensor(ranks)[:, None]
    a = torch.randn(num_slots, n * r, h_in, generator=gen) / h_in**0.5
    a *= (torch.arange(r).repeat(n)[None, :] < rank_of)[..., None]
    b = torch.randn(num_slots, sum(out_slices), r, generator=gen) / r**0.5
    b *= (torch.arange(r)[None, :] < rank_of)[:, None, :]
    scales = torch.rand(num_slots, generator=gen) + 0.5
    return a.to(device, dtype), b.to(device, dtype), scales.to(device)


def make_case(slots: list[int], num_slots: int, ranks: list[int], h_in: int, out_slices: list[int],
              dtype: torch.dtype, device: str = DEVICE, seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    a, b, scales = make_weights(num_slots, max(ranks), ranks, h_in, out_slices, dtype, device, gen)
    t, o = len(slots), sum(out_slices)
    x = torch.randn(t, h_in + 3, generator=gen).to(device, dtype)[:, :h_in]
    y_full = torch.randn(t, o + GUARD, generator=gen).to(device, dtype)
    y_full[:, o:] = float("nan")
    return Case(x, y_full, a, b, scales, ranks, out_slices, LoRABatchMeta.build(slots, device))


def naive_add_lora(case: Case) -> torch.Tensor:
    """Per-token loop over unpadded A/B of each slot's true rank, in float32."""
    y = case.y.float().clone()
    r_max = case.lora_b.shape[2]
    for t, s in enumerate(case.meta.token_slots.tolist()):
        if s < 0:
            continue
        off, r = 0, case.ranks[s]
        for i, out in enumerate(case.out_slices):
            a = case.lora_a[s, i * r_max:i * r_max + r].float()
            b = case.lora_b[s, off:off + out, :r].float()
            y[t, off:off + out] += case.scales[s] * (b @ (a @ case.x[t].float()))
            off += out
    return y


def shrink(case: Case, kind: str, ops, buf: torch.Tensor | None, block_m: int = 16,
           split_k: int | None = None) -> torch.Tensor:
    m, extra = case.meta, {} if split_k is None else {"split_k": split_k}
    if kind == "sgmv":
        return ops.sgmv_shrink(case.x, case.lora_a, m.tiles(block_m, case.lora_a.shape[0]), buf=buf, **extra)
    return ops.bgmv_shrink(case.x, case.lora_a, m.token_slots, buf=buf, **extra)


def expand(case: Case, kind: str, ops, y: torch.Tensor, h: torch.Tensor, block_m: int = 16) -> None:
    m = case.meta
    if kind == "sgmv":
        ops.sgmv_expand(y, h, case.lora_b, case.scales, case.out_slices, m.tiles(block_m, case.lora_b.shape[0]))
    else:
        ops.bgmv_expand(y, h, case.lora_b, case.scales, case.out_slices, m.token_slots)


def run_ops(case: Case, kind: str, ops, partials: int = 0, block_m: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink into a NaN-poisoned buffer ([T, N], or [P, T, N] partials), then expand the reference
    h into a copy of y. Returns (h as shrink returned it, y)."""
    buf = lora.lora_buffer(case.x.shape[0], case.lora_a, partials).fill_(float("nan"))
    h = shrink(case, kind, ops, buf, block_m)
    y = case.fresh_y()
    expand(case, kind, ops, y, lora_torch.bgmv_shrink(case.x, case.lora_a, case.meta.token_slots), block_m)
    return h, y


def check_against_reference(case: Case, kind: str, h: torch.Tensor, y: torch.Tensor) -> None:
    """h: what the kernel's shrink returned from a NaN-poisoned buffer; y: its expand of the reference h."""
    ref_h, ref_y = run_ops(case, kind, lora_torch)
    base = case.meta.token_slots[:case.x.shape[0]] < 0
    summed = h.sum(0) if h.dim() == 3 else h
    assert torch.isfinite(summed[~base]).all(), "shrink left rows of LoRA tokens unwritten"
    assert torch.isnan(summed[base]).all(), "base rows are no work: their (NaN-poisoned) rows stay unwritten"
    assert_close(summed[~base], ref_h[~base], BUF_TOL)
    assert torch.isfinite(y).all()
    assert_close(y.float(), ref_y.float(), TOLS[y.dtype])
    assert torch.equal(y[base], case.y[base]), "base rows must stay untouched"
    guard = y.as_strided((y.shape[0], GUARD), (y.stride(0), 1), y.storage_offset() + y.shape[1])
    assert torch.isnan(guard).all(), "expand wrote past the last slice"


@pytest.fixture(autouse=True, scope="module")
def _kernels_can_run():
    if DEVICE == "cpu" and not lora_triton._INTERPRETED:
        pytest.fail("loraplex.kernels.lora_triton was imported before TRITON_INTERPRET=1 was set")


# ---- batch metadata, tiles and the plan

def test_meta_build_counts_segments_slots_and_lora_rows():
    m = LoRABatchMeta.build([3, 3, -1, -1, 2, 3, 3, 3], "cpu")
    assert m.seg_starts is not None and m.seg_slots is not None
    assert m.seg_starts.tolist() == [0, 2, 4, 5, 8] and m.seg_slots.tolist() == [3, -1, 2, 3]
    assert m.token_slots.tolist() == [3, 3, -1, -1, 2, 3, 3, 3] and m.token_slots.dtype == torch.int32
    assert (m.num_tokens, m.num_segs, m.max_seg_len, m.no_lora, m.num_slots, m.lora_tokens) == (8, 4, 3, False, 2, 6)
    assert LoRABatchMeta.build([-1, -1], "cpu").no_lora
    empty = LoRABatchMeta.build([], "cpu")
    assert (empty.num_tokens, empty.num_segs, empty.no_lora, empty.num_slots) == (0, 0, True, 0)


def test_lora_buffer_partials_shrink_as_tokens_grow():
    a = torch.empty(2, 48, 16)
    assert lora.lora_buffer(8, a).shape == (lora.PARTIALS, 8, 48)
    assert lora.lora_buffer(lora.PARTIALS_MAX_TOKENS, a).shape[0] == lora.PARTIALS
    assert lora.lora_buffer(2 * lora.PARTIALS_MAX_TOKENS, a).shape[0] == lora.PARTIALS // 2
    assert lora.lora_buffer(64 * lora.PARTIALS_MAX_TOKENS, a).shape[0] == 1
    assert lora.lora_buffer(8, a, partials=0).shape == (8, 48)


def test_plan_follows_rows_per_adapter_and_rank():
    assert lora.plan(32, 32) == LoRAPlan("bgmv", 16)  # decode, one adapter per request
    assert lora.plan(32, None).kind == "bgmv"  # unknown spread (a captured graph): as if distinct
    assert lora.plan(32, 1) == LoRAPlan("sgmv", 32)  # decode, one adapter for all
    assert lora.plan(4096, 1) == LoRAPlan("sgmv", 64)  # one long prefill segment
    assert lora.plan(4096, 32) == LoRAPlan("sgmv", 64)
    assert lora.plan(96, 32).kind == "bgmv" and lora.plan(96, 32, rank=64).kind == "sgmv"
    assert lora.plan(4096, 1, lora_tokens=40) == LoRAPlan("sgmv", 64)  # base rows do not count
    meta = LoRABatchMeta.build([0] * 40 + [1] * 3, "cpu")
    assert not lora.use_bgmv(meta) and lora.use_bgmv(meta, "bgmv")
    decode = LoRABatchMeta.build([0, 1, 1, 2, -1], "cpu")
    assert lora.use_bgmv(decode) and not lora.use_bgmv(decode, "sgmv")


def covered(tiles: lora.LoRATiles) -> list[tuple[int, int]]:
    """(token, slot) of every tile row; checks that a tile is one slot and at most block_m rows."""
    out = []
    rows = tiles.rows.tolist()
    for slot, first, end, _ in tiles.table[:tiles.num_tiles].tolist():
        if slot < 0:
            assert first == end == -1
            continue
        assert 0 < end - first <= tiles.block_m
        out += [(rows[i], slot) for i in range(first, end)]
    return out


def random_slot_maps() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    maps = [[], [-1] * 5, [4] * 100, [0, 1] * 20, token_slots([2, -1, 2, 0, 2], [30, 5, 17, 1, 40])]
    for n in (1, 7, 64, 133):
        maps.append(torch.randint(-1, 6, (n,), generator=gen).tolist())
    return maps


@pytest.mark.parametrize("block_m", BLOCK_MS)
def test_host_tiles_cover_each_lora_row_once(block_m: int):
    for slots in random_slot_maps():
        meta = LoRABatchMeta.build(slots, "cpu")
        tiles = meta.tiles(block_m, 6)
        assert sorted(covered(tiles)) == sorted((t, s) for t, s in enumerate(slots) if s >= 0)
        runs = [n for s in set(slots) if s >= 0 for n in [slots.count(s)]]
        assert tiles.num_tiles == sum(-(-n // block_m) for n in runs)
        assert tiles.num_tiles <= lora_plan.max_tiles(len(slots), 6, block_m)
        rows = [t for t, _ in covered(tiles)]
        assert rows == sorted(rows, key=lambda t: (slots[t], t)), "rows grouped by slot, in token order"


@pytest.mark.parametrize("block_m", BLOCK_MS)
def test_device_tiles_equal_host_tiles(block_m: int):
    """The torch-ops builder (fixed sizes, no host sync) gives the host's table, then unused entries."""
    for slots in random_slot_maps():
        if not slots:
            continue
        host = LoRABatchMeta.build(slots, "cpu").tiles(block_m, 6)
        dev = lora_plan.device_tiles(torch.tensor(slots, dtype=torch.int32), block_m, 6)
        assert dev.num_tiles == lora_plan.max_tiles(len(slots), 6, block_m) >= host.num_tiles
        assert dev.table[:host.num_tiles].tolist() == host.table.tolist()
        assert (dev.table[host.num_tiles:] == -1).all()
        assert dev.rows[:len(host.rows)].tolist() == host.rows.tolist()


# ---- the ops against their references

@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_ops_by_adapter_distribution(dist: str, dtype: torch.dtype, kind: str):
    gen = torch.Generator().manual_seed(1)
    req = request_slots(dist, 6, 8, gen)
    lengths = torch.randint(1, 5, (6,), generator=gen).tolist()
    case = make_case(token_slots(req, lengths), 8, [16] * 8, 48, [32, 16, 16], dtype)
    check_against_reference(case, kind, *run_ops(case, kind, lora_triton))


@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("num_tokens", [1, 3, 7, 33])
def test_ops_by_batch_size(num_tokens: int, kind: str):
    gen = torch.Generator().manual_seed(num_tokens)
    req = request_slots("uniform", num_tokens, 4, gen)
    lengths = torch.randint(1, 6, (num_tokens,), generator=gen).tolist()
    slots = token_slots(req, lengths)[:num_tokens]
    case = make_case(slots, 4, [16] * 4, 40, [24, 40], torch.bfloat16, seed=num_tokens)
    check_against_reference(case, kind, *run_ops(case, kind, lora_triton))


@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("ranks", [[8] * 4, [16] * 4, [64] * 4, [8, 64, 16, 32]], ids=["8", "16", "64", "mixed"])
def test_ops_by_rank(ranks: list[int], kind: str):
    """With a [2, T, N] partial-sum buffer (split H_in in two)."""
    slots = token_slots([0, 1, -1, 2, 3, 1], [3, 1, 2, 4, 1, 2])
    case = make_case(slots, 4, ranks, 64, [64], torch.float16, seed=len(set(ranks)))
    check_against_reference(case, kind, *run_ops(case, kind, lora_triton, partials=2))


@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("block_m", [16, 64])
def test_one_long_segment_of_one_slot(block_m: int, rank: int):
    """The prefill of one adapter: one run of 150 rows becomes ceil(150 / block_m) tiles; qkv slices."""
    case = make_case([1] * 150, 2, [rank, rank], 40, [32, 16, 16], torch.bfloat16, seed=rank)
    assert case.meta.tiles(block_m, 2).num_tiles == -(-150 // block_m)
    check_against_reference(case, "sgmv", *run_ops(case, "sgmv", lora_triton, partials=2, block_m=block_m))


@pytest.mark.parametrize("block_m", BLOCK_MS)
def test_ragged_segments_with_base_rows(block_m: int):
    """Segments of 1..70 rows over 5 slots, base runs between them, gate_up-like slices."""
    gen = torch.Generator().manual_seed(block_m)
    lengths = torch.randint(1, 71, (9,), generator=gen).tolist()
    slots = token_slots([3, -1, 0, 3, -1, 4, 1, 0, 2], lengths)
    case = make_case(slots, 5, [16, 8, 16, 64, 16], 36, [40, 40], torch.float16, seed=block_m)
    check_against_reference(case, "sgmv", *run_ops(case, "sgmv", lora_triton, partials=3, block_m=block_m))


@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("partials", [0, 3], ids=["no-split", "partials"])
def test_split_k(kind: str, partials: int):
    """H_in split over programs as partial sums in [P, T, N] over an input size that no block divides;
    shrink returns the partials it wrote; expand sums them. A [T, N] buffer takes no split."""
    case = make_case(token_slots([0, -1, 1, 0], [3, 2, 1, 1]), 2, [16, 8], 600, [16, 24], torch.float32)
    buf = torch.full((partials, 7, 32) if partials else (7, 32), float("nan"), device=DEVICE)
    h = shrink(case, kind, lora_triton, buf, split_k=3 if partials else None)
    assert h.shape == ((3, 7, 32) if partials else (7, 32)) and h.data_ptr() == buf.data_ptr()
    ref_h, ref_y = run_ops(case, kind, lora_torch)
    lora_rows = case.meta.token_slots >= 0
    assert_close((h.sum(0) if partials else h)[lora_rows], ref_h[lora_rows], BUF_TOL)
    y = case.fresh_y()
    expand(case, kind, lora_triton, y, h)
    assert_close(y, ref_y, TOLS[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_lora_torch_matches_naive_loop(dtype: torch.dtype):
    slots = token_slots([2, -1, 0, 2, 1, -1], [4, 2, 1, 3, 1, 1])
    case = make_case(slots, 3, [8, 16, 4], 32, [32, 16, 16], dtype, device="cpu", seed=3)
    for kind in ("sgmv", "bgmv"):
        y = case.fresh_y()
        add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.out_slices, case.meta, kind=kind)
        assert_close(y.float(), naive_add_lora(case), TOLS[dtype])
        base = case.meta.token_slots < 0
        assert torch.equal(y[base], case.y[base])


@pytest.mark.parametrize("slots", [[0, 1, 2, -1, 1], [1] * 9 + [-1] * 2 + [0] * 6, [2] * 70 + [-1] * 3 + [2] * 5],
                         ids=["decode", "prefill", "long"])
def test_add_lora_triton_matches_naive_loop(slots: list[int]):
    case = make_case(slots, 3, [16, 8, 16], 32, [48, 16], torch.float32, seed=4)
    y = case.fresh_y()
    add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.out_slices, case.meta, backend="triton")
    assert_close(y.float(), naive_add_lora(case), TOLS[torch.float32])


@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
def test_add_lora_with_slots_only_on_the_device(kind: str):
    """LoRABatchMeta.on_device (a graph's slot buffer): SGMV builds its tiles with device ops."""
    slots = [2, 0, -1, 2, 2, 1, 0, 2, -1, 2]
    case = make_case(slots, 3, [16, 16, 16], 32, [16, 32], torch.float32, seed=8)
    meta = LoRABatchMeta.on_device(case.meta.token_slots, LoRAPlan(kind, 16))  # type: ignore[arg-type]
    assert meta.plan_for(16).kind == kind and LoRABatchMeta.on_device(case.meta.token_slots).plan_for(16).kind == "bgmv"
    y = case.fresh_y()
    add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.out_slices, meta, backend="triton")
    assert_close(y.float(), naive_add_lora(case), TOLS[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_lora_without_lora_rows_leaves_y(backend: str):
    case = make_case([-1, -1, -1], 2, [8, 8], 16, [16], torch.float32, seed=5)
    y = case.fresh_y()
    add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.out_slices, case.meta, backend=backend)
    assert torch.equal(y, case.y)


@pytest.mark.parametrize("partials", [0, 1, 2])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shrink_fills_given_buffer(backend: str, partials: int):
    case = make_case([0, 0, 1], 2, [8, 8], 16, [16, 16], torch.float32, seed=6)
    buf = lora.lora_buffer(3, case.lora_a, partials).fill_(float("nan"))
    assert buf.shape == ((partials, 3, 16) if partials else (3, 16))
    for op in (lora.sgmv_shrink, lora.bgmv_shrink):
        h = op(case.x, case.lora_a, case.meta, buf=buf, backend=backend)  # type: ignore[arg-type]
        assert h.data_ptr() == buf.data_ptr() and torch.isfinite(h).all()
        expected = lora_torch.bgmv_shrink(case.x, case.lora_a, case.meta.token_slots)
        assert_close(h.sum(0) if partials else h, expected, BUF_TOL)


def test_warmup_runs_every_variant_and_leaves_weights():
    case = make_case([0, 1], 2, [8, 8], 16, [16, 8], torch.float32)
    before = (case.lora_a.clone(), case.lora_b.clone())
    lora.warmup(case.lora_a, case.lora_b, case.scales, case.out_slices, backend="triton")
    assert torch.equal(before[0], case.lora_a) and torch.equal(before[1], case.lora_b)


def test_add_lora_rejects_mismatched_shapes():
    case = make_case([0, 1], 2, [8, 8], 16, [16, 8], torch.float32, device="cpu")
    with pytest.raises(ValueError, match="lora_a"):
        add_lora(case.y, case.x, case.lora_a, case.lora_b, case.scales, [16, 4, 4], case.meta)
    with pytest.raises(ValueError, match="scales"):
        add_lora(case.y, case.x, case.lora_a, case.lora_b, case.scales.half(), case.out_slices, case.meta)
