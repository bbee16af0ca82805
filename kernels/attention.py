"""Paged attention and the KV-cache write: public API, torch references and device dispatch.

The KV cache of one layer is ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``.
A step's tokens from several sequences are flattened into ``T`` rows (each sequence's
tokens contiguous); each sequence's queries attend to its whole context (cached blocks
+ this step's tokens) through its block table, causally.

CUDA tensors run the Triton kernels (``attention_triton``: K/V read in place through the
block table, split-KV decode), others the torch references below, which gather every
block; ``backend="triton"`` forces the kernels (on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "triton", "torch"]


def use_triton(x: torch.Tensor, backend: Backend) -> bool:
    """The Triton kernels for CUDA tensors (auto) or when forced; the torch references otherwise."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend == "triton" or (backend == "auto" and x.device.type == "cuda")


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, backend: Backend = "auto") -> None:
    """k_cache.view(-1, Hkv, D)[slot_mapping] = k  (same for v); rows whose slot is < 0 are skipped.

    k, v: [T, Hkv, D]; slot_mapping: [T] int32/int64 (block_id * block_size + offset, or -1 for padding).
    The Triton path writes K and V in one launch; the torch path syncs with the host when a slot is < 0.
    """
    if use_triton(k, backend):
        from . import attention_triton

        attention_triton.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    slots = slot_mapping.long()
    if slots.numel() and bool((slots < 0).any()):
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def query_start_locations(query_lens: torch.Tensor) -> torch.Tensor:
    """[B+1] int32 cumulative query lengths, computed on the device (no host sync)."""
    return F.pad(query_lens.cumsum(0), (1, 0)).to(torch.int32)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_lens: torch.Tensor, query_index: torch.Tensor, max_query_len: int,
                    scale: float, sliding_window: int | None = None, mask: torch.Tensor | None = None, *,
                    backend: Backend = "auto", query_start_loc: torch.Tensor | None = None,
                    tiles: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged context.

    out[t] = softmax(q[t] @ K_b[:pos_t+1].T * scale) @ V_b[:pos_t+1]   for token t of sequence b,
    where pos_t = seq_lens[b] - query_lens[b] + i (its position) and K_b/V_b are read through block_tables[b];
    with a sliding window W only keys j with pos_t - W < j <= pos_t count.

    q: [T, H, D], tokens of one sequence contiguous; k_cache, v_cache: [N, BS, Hkv, D];
    block_tables: [B, max_blocks] int32/int64; seq_lens, query_lens: [B] (context length after this
    step, new tokens this step); query_index: [T] int64, flat index ``b * max_query_len + i`` of token t
    (torch path); query_start_loc: [B+1] int32 cumulative query lengths (Triton path; computed from
    query_lens on the device when None); returns [T, H, D].
    mask: optional precomputed ``causal_mask(...)`` [B, max_query_len, max_blocks * BS] (torch path).
    tiles: optional [NT, 2] int32 tile map of the multi-token rows (Triton path,
    ``attention_triton.fill_tile_map``): launch sizes from shapes alone, for a captured mixed step.
    The Triton path reads no value on the host and allocates only by shape (CUDA-graph safe).
    """
    if use_triton(q, backend):
        from . import attention_triton

        if query_start_loc is None:
            query_start_loc = query_start_locations(query_lens)
        return attention_triton.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                max_query_len, scale, sliding_window, tiles=tiles)
    return paged_attention_torch(q, k_cache, v_cache, block_tables.long(), seq_lens, query_lens, query_index,
                                 max_query_len, scale, sliding_window, mask)


def warm_up(num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
            sliding_window: int | None = None, *, backend: Backend = "auto") -> None:
    """Compiles, before serving, every Triton attention variant a step of this layer configuration
    can launch (none compiles afterwards: the step-dependent integers are runtime values). The
    torch path has nothing to compile."""
    if use_triton(k_cache, backend):
        from . import attention_triton

        attention_triton.warm_up(num_heads, k_cache, v_cache, scale, sliding_window)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor, query_lens: torch.Tensor, query_index: torch.Tensor,
                          max_query_len: int, scale: float, sliding_window: int | None = None,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: gathers every block of every sequence, then one masked SDPA (see paged_attention)."""
    num_seqs, max_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    groups = num_heads // num_kv_heads
    max_kv = max_blocks * block_size
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
