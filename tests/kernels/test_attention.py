"""Paged attention over scattered blocks equals plain causal attention of each sequence (float32)."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.attention import attention_reference, paged_attention, write_kv


def _case(seq_lens: list[int], query_lens: list[int], heads: int, kv_heads: int, block_size: int = 4,
          window: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = 16
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g)  # garbage outside the tables
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, full_k, full_v, queries = [], [], [], []
    for n in seq_lens:
        nb = -(-n // block_size)
        tables.append([perm.pop() for _ in range(nb)])
        full_k.append(torch.randn(n, kv_heads, d, generator=g))
        full_v.append(torch.randn(n, kv_heads, d, generator=g))
        queries.append(torch.randn(n, heads, d, generator=g))
    for table, k, v in zip(tables, full_k, full_v, strict=True):  # the whole context is in the cache
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(len(k))])
        write_kv(k, v, k_cache, v_cache, slots)
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    max_q = max(query_lens)
    q = torch.cat([qs[n - ql:] for qs, n, ql in zip(queries, seq_lens, query_lens, strict=True)])
    index = torch.cat([torch.arange(ql) + b * max_q for b, ql in enumerate(query_lens)])
    out = paged_attention(q, k_cache, v_cache, block_tables, torch.tensor(seq_lens), torch.tensor(query_lens),
                          index, max_q, scale=d ** -0.5, sliding_window=window)
    expected = []
    for qs, k, v, n, ql in zip(queries, full_k, full_v, seq_lens, query_lens, strict=True):
        ref = attention_reference(qs, k, v, d ** -0.5) if window is None else _windowed(qs, k, v, d ** -0.5, window)
        expected.append(ref[n - ql:])
    return out, torch.cat(expected)


def _windowed(q, k, v, scale, window):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    i = torch.arange(q.shape[0]).unsqueeze(1)
    j = torch.arange(k.shape[0]).unsqueeze(0)
    scores = scores.masked_fill((j > i) | (j <= i - window), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize(("seq_lens", "query_lens"), [
    ([5], [5]),  # one prefill
    ([9, 1, 13], [1, 1, 1]),  # decodes
    ([9, 17, 4, 30], [3, 17, 1, 8]),  # chunked prefill mixed with decodes
])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_paged_equals_plain_attention(seq_lens, query_lens, heads, kv_heads):
    out, expected = _case(seq_lens, query_lens, heads, kv_heads)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sliding_window():
    out, expected = _case([20, 11], [20, 2], 4, 2, window=6)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
