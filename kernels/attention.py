"""Paged attention, pure torch (the reference path; runs on CPU and CUDA).

The KV cache of one layer is ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``.
A step's tokens from several sequences are flattened into ``T`` rows; each
sequence's queries attend to its whole context (cached blocks + this step's
tokens) through its block table, causally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache.view(-1, Hkv, D)[slot_mapping] = k  (same for v).

    k, v: [T, Hkv, D]; slot_mapping: [T] int64 (block_id * block_size + offset).
    """
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_lens: torch.Tensor, query_index: torch.Tensor, max_query_len: int,
                    scale: float, sliding_window: int | None = None, mask: torch.Tensor | None = None, *,
                    backend: str = "auto", query_start_loc: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged context.

    out[t] = softmax(q[t] @ K_b[:pos_t+1].T * scale) @ V_b[:pos_t+1]   for token t of sequence b,
    where pos_t = seq_lens[b] - query_lens[b] + i (its position) and K_b/V_b are gathered by block_tables[b].

    q: [T, H, D]; k_cache, v_cache: [N, BS, Hkv, D]; block_tables: [B, max_blocks] int64;
    seq_lens, query_lens: [B] int64 (context length after this step, new tokens this step);
    query_index: [T] int64, flat index ``b * max_query_len + i`` of token t; returns [T, H, D].
    mask: optional precomputed ``causal_mask(...)`` [B, max_query_len, max_blocks * BS] (shared by the layers).
    """
    num_seqs, max_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    groups = num_heads // num_kv_heads
    max_kv = max_blocks * block_size
    block_tables = block_tables.long()
    keys = k_cache[block_tables].view(num_seqs, max_kv, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache[block_tables].view(num_seqs, max_kv, num_kv_heads, head_dim).transpose(1, 2)
    q_pad = q.new_zeros(num_seqs * max_query_len, num_heads, head_dim)
    q_pad[query_index] = q
    # GQA without copying K/V: the G query heads of one KV head become G*Q query rows.
    q_pad = q_pad.view(num_seqs, max_query_len, num_kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4)
    q_pad = q_pad.reshape(num_seqs, num_kv_heads, groups * max_query_len, head_dim)
    if mask is None:
        mask = causal_mask(seq_lens, query_lens, max_query_len, max_kv, sliding_window)
    mask = mask.unsqueeze(1).expand(num_seqs, groups, max_query_len, max_kv)
    mask = mask.reshape(num_seqs, 1, groups * max_query_len, max_kv)
    out = F.scaled_dot_product_attention(q_pad, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale)
    out = out.view(num_seqs, num_kv_heads, groups, max_query_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_seqs * max_query_len, num_heads, head_dim)[query_index]


def causal_mask(seq_lens: torch.Tensor, query_lens: torch.Tensor, max_query_len: int, max_kv: int,
                 sliding_window: int | None) -> torch.Tensor:
    """[B, max_query_len, max_kv] bool, True where query i of sequence b may attend key j."""
    device = seq_lens.device
    i = torch.arange(max_query_len, device=device)
    j = torch.arange(max_kv, device=device)
    pos = (seq_lens - query_lens).unsqueeze(1) + i.unsqueeze(0)  # [B, Q] position of each query
    allowed = j.view(1, 1, -1) <= pos.unsqueeze(-1)
    if sliding_window is not None:
        allowed &= j.view(1, 1, -1) > pos.unsqueeze(-1) - sliding_window
    allowed[..., 0] |= ~(i.unsqueeze(0) < query_lens.unsqueeze(1))  # padded rows: any key, output dropped
    return allowed


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention of one sequence, float32: q [S, H, D], k/v [S, Hkv, D] -> [S, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1)
    v = v.float().repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    causal = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
