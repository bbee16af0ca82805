"""Triton paged attention and KV-cache write, twins of the torch references in ``attention``.

K/V are read in place through the block table: a tile of ``BLOCK_N`` key positions looks up
each position's block (``block_tables[b, pos // BS]``), so any power-of-two block size works
and no dense copy of a sequence's context is ever made.

One kernel serves both step kinds. A program owns one sequence, one KV head and a tile of
``BLOCK_Q`` query tokens times the ``G = H / Hkv`` query heads of that KV head, flattened into
``BLOCK_M = BLOCK_Q * G_PAD`` rows (GQA/MQA read each K/V tile once for the whole group).
- decode (max_query_len == 1): BLOCK_Q = 1 and the context is cut into ``splits`` ranges
  (flash-decoding); each split writes a normalised partial output and its log-sum-exp, and
  a second kernel merges them. The split count depends only on shapes (CUDA-graph safe).
- prefill / mixed: a grid of (sequence, query tile) programs; tiles past a sequence's query
  count exit at once. Online softmax in float32, causal and sliding-window masks.
Nothing here reads a tensor value on the host.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch
import triton
import triton.language as tl

from .variants import count_compiled

LOG2E = 1.4426950408889634
TARGET_PROGRAMS = 512  # decode: split the context until the launch has about this many programs
MAX_SPLITS = 64
MIN_SPLIT_TOKENS = 64  # decode: no split shorter than this (by the table width); H200 sweep: 64 best
# Mixed steps whose block table spans at least this many tokens run their one-token rows through
# the split decode launch (a second launch) instead of the prefill tiles, which would give each
# long decode row one program and BLOCK_Q-fold matrix work.
MIXED_SPLIT_MIN_KV = 2048
ALL_ROWS, DECODE_ROWS, MULTI_ROWS = 0, 1, 2  # which sequences a launch serves (by query count)
_DECODE_ROWS: tl.constexpr = tl.constexpr(DECODE_ROWS)
_MULTI_ROWS: tl.constexpr = tl.constexpr(MULTI_ROWS)
# Launch configurations (block_m: query rows = tokens x padded group); "BIG": head_dim > 128 or float32.
DECODE = {"block_n": 64, "warps": 4, "stages": 3}
DECODE_BIG = {"block_n": 32, "warps": 4, "stages": 3}
PREFILL = {"block_m": 128, "block_n": 64, "warps": 8, "stages": 2}
PREFILL_BIG = {"block_m": 64, "block_n": 32, "warps": 4, "stages": 2}


# Everything that changes from step to step is a runtime integer Triton never specialises (it would
# compile a new variant for a value equal to 1 or divisible by 16, or for each constexpr value: a
# compile costs ~100 ms on the H200's host, more than a whole step): the query-tile count, the split
# count and the block table's row stride (its width follows the longest context of the step).
@triton.jit(do_not_specialize=["q_tiles", "splits", "s_bt"])
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    bt_ptr, seq_lens_ptr, qsl_ptr, tiles_ptr,
    scale_log2, window,
    s_qt, s_qh, s_kn, s_kb, s_kh, s_vn, s_vb, s_vh, s_ot, s_oh, s_bt,
    H, q_tiles, splits,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_F32: tl.constexpr, ROWS: tl.constexpr, TILED: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    if TILED:  # program -> (sequence, first query token) from the host's tile map; -1: unused entry
        b = tl.load(tiles_ptr + 2 * tl.program_id(0))
        i0 = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
        if b < 0:
            return
    else:
        b = tl.program_id(0) // q_tiles
        i0 = (tl.program_id(0) % q_tiles) * BLOCK_Q
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if i0 >= q_len:
        return
    if ROWS == _DECODE_ROWS and q_len != 1:
        return
    if ROWS == _MULTI_ROWS and q_len == 1:
        return
    ctx = tl.load(seq_lens_ptr + b).to(tl.int32) - q_len  # position of the first query token
    rows = tl.arange(0, BLOCK_M)
    qi = i0 + rows // G_PAD
    g = rows % G_PAD
    row_ok = (qi < q_len) & (g < G)
    pos = ctx + qi
    heads = kvh * G + g
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q = tl.load(q_ptr + (q_start + qi).to(tl.int64)[:, None] * s_qt + heads[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # keys this tile may see: [lo, hi)
    hi = ctx + tl.minimum(i0 + BLOCK_Q, q_len)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx + i0 - window + 1, 0)
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(hi - lo, splits), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    for start in range(lo, hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_ok = kpos < hi
        blk = tl.load(bt_row + kpos // BS, mask=k_ok, other=0).to(tl.int64)
        off = kpos % BS
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + (blk * s_kn + off * s_kb + kvh * s_kh)[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k.to(q.dtype)))
        qk = qk * scale_log2
        visible = k_ok[None, :] & (kpos[None, :] <= pos[:, None])
        if USE_WINDOW:
            visible = visible & (kpos[None, :] > pos[:, None] - window)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet stay at 0
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (blk * s_vn + off * s_vb + kvh * s_vh)[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if SPLIT:  # partials [B, splits, H, D] float32 and their log2-sum-exp2 [B, splits, H]
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        part = (b * splits + split).to(tl.int64) * H + heads
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        tl.store(part_o_ptr + part[:, None] * D + d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(out_ptr + (q_start + qi).to(tl.int64)[:, None] * s_ot + heads[:, None] * s_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["splits"])
def _merge_splits_kernel(out_ptr, part_o_ptr, part_lse_ptr, qsl_ptr, s_ot, s_oh, H, splits,
                         D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) - q_start != 1:  # only one-token rows are split
        return
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    part = (b * splits + s).to(tl.int64) * H + h
    lse = tl.load(part_lse_ptr + part, mask=s < splits, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.math.exp2(lse - m)  # split 0 always holds keys, so m is finite
    w = w / tl.sum(w, 0)
    o = tl.load(part_o_ptr + part[:, None] * D + d[None, :], mask=(s < splits)[:, None] & (d < D)[None, :],
                other=0.0)
    out = tl.sum(o * w[:, None], 0)
    tl.store(out_ptr + q_start.to(tl.int64) * s_ot + h * s_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _dot_f32(dtype: torch.dtype) -> bool:
    """float32 dots for float32 inputs, and for bf16 under the interpreter (its bf16 dot is wrong)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def num_splits(batch: int, num_kv_heads: int, max_kv: int) -> int:
    """Decode split count from static shapes: enough programs to fill the GPU, splits >= MIN_SPLIT_TOKENS."""
    by_programs = triton.cdiv(TARGET_PROGRAMS, max(batch * num_kv_heads, 1))
    by_length = triton.cdiv(max_kv, MIN_SPLIT_TOKENS)
    return max(1, min(MAX_SPLITS, by_programs, by_length))


def _config(decode: bool, group: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(G_PAD, BLOCK_Q, BLOCK_N, num_warps, num_stages) from the tables above."""
    g_pad = triton.next_power_of_2(group)
    big = head_dim > 128 or dtype == torch.float32
    cfg = (DECODE_BIG if big else DECODE) if decode else (PREFILL_BIG if big else PREFILL)
    if decode:
        return max(16, g_pad), 1, cfg["block_n"], cfg["warps"], cfg["stages"]
    return g_pad, max(1, cfg["block_m"] // g_pad), cfg["block_n"], cfg["warps"], cfg["stages"]


def prefill_block_q(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Query tokens per program of the multi-token launch: the unit of a tile map."""
    return _config(False, num_heads // num_kv_heads, head_dim, dtype)[1]


def max_tile_entries(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Tiles a step of num_tokens tokens over num_seqs multi-token sequences can need at most."""
    return max(1, min(num_seqs, num_tokens // 2) + num_tokens // block_q)


def fill_tile_map(query_lens: np.ndarray, block_q: int, out: np.ndarray) -> int:
    """Writes the (sequence, first query token) of every query tile of the rows with more than one
    query token into out [NT, 2] (host, int32) and -1 into the rest; returns the tiles used."""
    lens = np.asarray(query_lens, dtype=np.int64)
    seqs = np.flatnonzero(lens > 1)
    per = -(-lens[seqs] // block_q)
    n = int(per.sum())
    if n > out.shape[0]:
        raise ValueError(f"{n} query tiles do not fit a tile map of {out.shape[0]}")
    seq = np.repeat(seqs, per)
    first = np.arange(n) - np.repeat(np.cumsum(per) - per, per)
    out[:n, 0], out[:n, 1] = seq, first * block_q
    out[n:] = -1
    return n


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                    sliding_window: int | None = None, out: torch.Tensor | None = None,
                    splits: int | None = None, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] (tokens of one sequence contiguous), k/v_cache [N, BS, Hkv, D], block_tables [B, M],
    seq_lens [B], query_start_loc [B+1] int32 -> out [T, H, D] (optional preallocated).
    splits: the decode split count (default: from the shapes, see num_splits).
    tiles: [NT, 2] int32 (sequence, first query token) of every query tile of the multi-token rows
    (``fill_tile_map``; -1 rows unused): the launch sizes then depend only on shapes, whatever the mix
    of query lengths, so one CUDA graph serves every step of T tokens (the one-token rows go through
    the split decode launch; max_query_len is not read)."""
    num_seqs, max_blocks = block_tables.shape
    block_size = k_cache.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    max_kv = max_blocks * block_size
    args = (q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale, sliding_window)
    if tiles is not None:
        _launch(*args, 2, MULTI_ROWS, 1, tiles)
        _launch(*args, 1, DECODE_ROWS, splits)
    elif max_query_len <= 1:
        _launch(*args, 1, ALL_ROWS, splits)
    elif max_kv < MIXED_SPLIT_MIN_KV:
        _launch(*args, max_query_len, ALL_ROWS, 1)
    else:
        _launch(*args, max_query_len, MULTI_ROWS, 1)
        _launch(*args, 1, DECODE_ROWS, splits)
    return out


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
            sliding_window: int | None, max_query_len: int, rows: int, splits: int | None,
            tiles: torch.Tensor | None = None) -> None:
    """One attention launch over the rows selected (decode config when max_query_len == 1; programs
    from the tile map when given), then the split merge if any."""
    num_seqs, max_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    decode = max_query_len <= 1
    g_pad, block_q, block_n, warps, stages = _config(decode, group, head_dim, q.dtype)
    if splits is None:
        splits = num_splits(num_seqs, num_kv_heads, max_blocks * block_size) if decode else 1
    q_tiles = triton.cdiv(max(max_query_len, 1), block_q)
    d_pad = triton.next_power_of_2(head_dim)
    window = sliding_window if sliding_window is not None and sliding_window > 0 else 0
    part_o = part_lse = out  # unused unless split
    assert splits <= MAX_SPLITS, f"splits={splits} > MAX_SPLITS={MAX_SPLITS}"
    if splits > 1:
        part_o = torch.empty(num_seqs, splits, num_heads, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, splits, num_heads, dtype=torch.float32, device=q.device)
    programs = num_seqs * q_tiles if tiles is None else tiles.shape[0]
    _attn_kernel[(programs, num_kv_heads, splits)](
        q, k_cache, v_cache, out, part_o, part_lse, block_tables, seq_lens, query_start_loc,
        query_start_loc if tiles is None else tiles,
        scale * LOG2E, window,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
        block_tables.stride(0), num_heads, q_tiles, splits,
        G=group, G_PAD=g_pad, D=head_dim, D_PAD=d_pad, BS=block_size, BLOCK_Q=block_q, BLOCK_N=block_n,
        SPLIT=splits > 1, USE_WINDOW=window > 0, DOT_F32=_dot_f32(q.dtype), ROWS=rows, TILED=tiles is not None,
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            out, part_o, part_lse, query_start_loc, out.stride(0), out.stride(1), num_heads, splits,
            D=head_dim, D_PAD=d_pad, S_PAD=triton.next_power_of_2(MAX_SPLITS), num_warps=4,
        )


def warm_up(num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
            sliding_window: int | None) -> None:
    """Compiles every attention variant a step can launch for this layer configuration (decode
    with and without splits, prefill tiles, the mixed step's multi-token and split one-token
    launches, the split merge), so that serving compiles none. Reads the cache's block 0 only."""
    _, block_size, _, head_dim = k_cache.shape
    device = k_cache.device
    wide = triton.cdiv(MIXED_SPLIT_MIN_KV, block_size)  # a table this wide takes the mixed split path

    def run(query_lens: list[int], width: int, splits: int | None, tiled: bool = False) -> None:
        tokens = sum(query_lens)
        q = torch.zeros(tokens, num_heads, head_dim, dtype=k_cache.dtype, device=device)  # q has the cache's dtype
        tables = torch.zeros(len(query_lens), width, dtype=torch.int32, device=device)
        # the engine's dtypes (a pointer's element type is part of a variant's key): int32 block
        # tables and query starts, int64 context lengths
        lens = torch.tensor(query_lens, dtype=torch.int64, device=device)  # the context is the query
        starts = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=device)
        tiles = None
        if tiled:
            block_q = prefill_block_q(num_heads, k_cache.shape[2], head_dim, k_cache.dtype)
            host = np.empty((max_tile_entries(tokens, len(query_lens), block_q), 2), dtype=np.int32)
            fill_tile_map(np.array(query_lens), block_q, host)
            tiles = torch.from_numpy(host).to(device)
        paged_attention(q, k_cache, v_cache, tables, lens, starts, max(query_lens), scale, sliding_window,
                        splits=splits, tiles=tiles)

    for splits in (1, 2):
        run([1, 1], 1, splits)  # decode
        run([3, 1], wide, splits)  # mixed, long table: multi-token tiles, then split decode rows
        run([3, 1], 1, splits, tiled=True)  # a captured mixed step: tile-map launch, split decode rows
    run([3, 1], 1, None)  # prefill / mixed, short table: one launch of tiles


def compiled_variants() -> int:
    """Attention binaries compiled so far in this process (0 in the interpreter)."""
    return count_compiled((_attn_kernel, _merge_splits_kernel, _write_kv_kernel))


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr,
                     s_kt, s_kh, s_vt, s_vh, s_cn, s_cb, s_ch, s_dn, s_db, s_dh,
                     HKV: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
                     BS: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BS
    off = slot % BS
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < HKV) & (d < D)
    k = tl.load(k_ptr + t * s_kt + h * s_kh + d, mask=mask)
    v = tl.load(v_ptr + t * s_vt + h * s_vh + d, mask=mask)
    tl.store(kc_ptr + blk * s_cn + off * s_cb + h * s_ch + d, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + blk * s_dn + off * s_db + h * s_dh + d, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """One launch for K and V: k/v [T, Hkv, D] into k/v_cache [N, BS, Hkv, D] at slot_mapping [T]
    (slot < 0 skipped)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        HKV=num_kv_heads, D=head_dim, H_PAD=triton.next_power_of_2(num_kv_heads),
        D_PAD=triton.next_power_of_2(head_dim), BS=k_cache.shape[1], num_warps=4,
    )
