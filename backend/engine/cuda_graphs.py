"""Decode steps captured in CUDA graphs and replayed, instead of thousands of eager launches.

A decode step (one new token per sequence) is captured once per (batch bucket, KV
bucket, with/without LoRA) over static input buffers; each step fills the buffers
and replays. Padded rows write their K/V into a dummy block that the block manager
never hands out, and attend only to it. LoRA rows go through the per-token (BGMV)
kernels, whose launch depends only on the token->slot buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loraplex.backend.layers.context import AttentionMeta, ForwardContext, forward_context
from loraplex.backend.models.llama import DecoderModel
from loraplex.kernels.lora import LoRABatchMeta

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MIN_KV_BLOCKS = 8


@dataclass
class DecodeBatch:
    """One decode step on the host: B sequences, one token each."""

    input_ids: list[int]  # [B]
    positions: list[int]  # [B]
    slot_mapping: list[int]  # [B]
    block_tables: list[list[int]]  # B rows of block ids
    seq_lens: list[int]  # [B]
    token_slots: list[int]  # [B] LoRA slot, -1 = base


class DecodeGraphs:
    def __init__(self, model: DecoderModel, block_size: int, dummy_block: int, max_blocks_per_seq: int,
                 max_batch: int, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.dummy_block = dummy_block
        self.max_blocks = max_blocks_per_seq
        self.buckets = [b for b in BATCH_BUCKETS if b <= max(max_batch, 1)] or [1]
        if self.buckets[-1] < min(max_batch, BATCH_BUCKETS[-1]):
            self.buckets.append(min(max_batch, BATCH_BUCKETS[-1]))
        n = self.buckets[-1]
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.input_ids, self.positions, self.slot_mapping = zeros(n), zeros(n), zeros(n)
        self.block_tables = zeros(n, self.max_blocks)
        self.seq_lens, self.query_lens = zeros(n) + 1, zeros(n) + 1
        self.query_index = torch.arange(n, dtype=torch.long, device=device)
        self.token_slots = torch.full((n,), -1, dtype=torch.int32, device=device)
        self.seg_starts = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.buckets[-1] and max_blocks <= self.max_blocks

    def run(self, batch: DecodeBatch) -> torch.Tensor:
        """Fills the static buffers, replays the matching graph; returns hidden states [B, hidden]."""
        b = len(batch.input_ids)
        bs = next(x for x in self.buckets if x >= b)
        longest = max(len(t) for t in batch.block_tables)
        kvb = min(self.max_blocks, max(MIN_KV_BLOCKS, 1 << (longest - 1).bit_length()))
        has_lora = any(s >= 0 for s in batch.token_slots)
        self._fill(batch, bs, kvb)
        key = (bs, kvb, has_lora)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, hidden = self.graphs[key]
        graph.replay()
        return hidden[:b]

    def _fill(self, batch: DecodeBatch, bs: int, kvb: int) -> None:
        pad = bs - len(batch.input_ids)
        dummy_slot = self.dummy_block * self.block_size
        tables = torch.full((bs, kvb), self.dummy_block, dtype=torch.long)
        for row, table in enumerate(batch.block_tables):
            tables[row, :len(table)] = torch.tensor(table, dtype=torch.long)
        self.block_tables[:bs, :kvb].copy_(tables, non_blocking=True)
        for buf, values, fill in ((self.input_ids, batch.input_ids, 0), (self.positions, batch.positions, 0),
                                  (self.slot_mapping, batch.slot_mapping, dummy_slot),
                                  (self.seq_lens, batch.seq_lens, 1), (self.token_slots, batch.token_slots, -1)):
            buf[:bs].copy_(torch.tensor(values + [fill] * pad, dtype=buf.dtype), non_blocking=True)

    def _context(self, bs: int, kvb: int, has_lora: bool) -> ForwardContext:
        attn = AttentionMeta(self.slot_mapping[:bs], self.block_tables[:bs, :kvb], self.seq_lens[:bs],
                             self.query_lens[:bs], self.query_index[:bs], max_query_len=1)
        lora = None
        if has_lora:
            lora = LoRABatchMeta(token_slots=self.token_slots[:bs], seg_starts=self.seg_starts[:bs + 1],
                                 seg_slots=self.token_slots[:bs], num_tokens=bs, num_segs=bs, max_seg_len=1,
                                 no_lora=False)
        return ForwardContext(attn, lora)

    def _capture(self, bs: int, kvb: int, has_lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        ids, pos = self.input_ids[:bs], self.positions[:bs]
        with forward_context(self._context(bs, kvb, has_lora)):
            self.model(ids, pos)  # warm-up: compiles kernels, settles the allocator
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # a fresh context: nothing computed outside the graph (the causal mask) may be reused inside it
        with torch.cuda.graph(graph, pool=self.pool), forward_context(self._context(bs, kvb, has_lora)):
            hidden = self.model(ids, pos)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, hidden
