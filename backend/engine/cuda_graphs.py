"""Whole decode steps captured in CUDA graphs at start-up and replayed.

One graph per (batch bucket, with/without LoRA) runs the model, the LM head and
the greedy argmax over persistent input buffers; a step fills the buffers with
three host-to-device copies and replays. Attention reads the paged cache in
place, so one graph serves every context length up to ``max_model_len``. Padded
rows write their K/V into a dummy block that the block manager never hands out.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from loraplex.backend.engine.step_inputs import StepInputs
from loraplex.backend.layers.context import AttentionMeta, ForwardContext, forward_context
from loraplex.backend.models.llama import DecoderModel
from loraplex.kernels.gemv import skinny_linear
from loraplex.kernels.lora import LoRABatchMeta

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model: DecoderModel, block_size: int, dummy_block: int, max_blocks_per_seq: int,
                 max_batch: int, device: torch.device, with_lora: bool, last_sampled: torch.Tensor):
        self.model = model
        self.block_size = block_size
        self.dummy_block = dummy_block
        self.max_blocks = max_blocks_per_seq
        self.buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.lora_modes = (False, True) if with_lora else (False,)
        self.last_sampled = last_sampled  # the previous step's tokens, for rows whose input is still on the device
        n = self.buckets[-1]
        # host staging (pinned) and device buffers: rows = input ids, positions, slots, seq lens, and the
        # row of last_sampled that holds a row's input token (-1: the host knows it)
        # Two staging sets, alternating: a step may be filled while the last step's copies still wait
        # in the stream; the step before that was waited for, so its set is free again.
        self.staging = [(torch.zeros((5, n), dtype=torch.int64, pin_memory=True),
                         torch.full((n,), -1, dtype=torch.int32, pin_memory=True),
                         torch.full((n, self.max_blocks), dummy_block, dtype=torch.int32, pin_memory=True))
                        for _ in range(2)]
        self.num_fills = 0
        self.dev_i64 = torch.zeros((5, n), dtype=torch.int64, device=device)
        self.token_slots = torch.full((n,), -1, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, self.max_blocks), dummy_block, dtype=torch.int32, device=device)
        self.query_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.query_index = torch.arange(n, dtype=torch.int64, device=device)
        self.seg_starts = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logits = torch.empty((n, model.lm_head.weight.shape[0]), dtype=model.lm_head.weight.dtype,
                                  device=device)
        self.greedy = torch.zeros(n, dtype=torch.int64, device=device)
        self._padding = np.array([[0], [0], [dummy_block * block_size], [1], [-1]])
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.pool: Any = None
        self.capture_seconds = 0.0
        self.graph_memory_bytes = 0

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    def capture_all(self) -> None:
        """Captures every bucket, largest first so that smaller ones reuse its memory pool."""
        t = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        for has_lora in self.lora_modes:
            for bs in reversed(self.buckets):
                self.graphs[(bs, has_lora)] = self._capture(bs, has_lora)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t
        self.graph_memory_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])

    def run(self, inputs: StepInputs, source: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fills the buffers and replays; returns (logits [B, V], greedy ids [B]) as views of static buffers.
        source: [B] row of last_sampled holding each row's input token, -1 where the host knows it."""
        b = len(inputs.requests)
        bs = next(x for x in self.buckets if x >= b)
        has_lora = bool((inputs.token_slots >= 0).any())
        self._fill(inputs, bs, source)
        self.graphs[(bs, has_lora and True in self.lora_modes)].replay()
        return self.logits[:b], self.greedy[:b]

    def _fill(self, inputs: StepInputs, bs: int, source: np.ndarray | None) -> None:
        b = len(inputs.requests)
        host_i64, host_slots, host_tables = self.staging[self.num_fills % 2]
        self.num_fills += 1
        staging = host_i64.numpy()
        staging[0, :b], staging[1, :b] = inputs.input_ids, inputs.positions
        staging[2, :b], staging[3, :b] = inputs.slot_mapping, inputs.seq_lens
        staging[4, :b] = -1 if source is None else source
        staging[:, b:bs] = self._padding
        slots = host_slots.numpy()
        slots[:b], slots[b:bs] = inputs.token_slots, -1
        tables = host_tables.numpy()
        width = inputs.block_tables.shape[1]
        tables[:b, :width] = inputs.block_tables
        tables[:b, width:] = self.dummy_block  # never read (seq_lens bound the reads), kept valid anyway
        tables[b:bs] = self.dummy_block
        self.dev_i64[:, :bs].copy_(host_i64[:, :bs], non_blocking=True)
        self.token_slots[:bs].copy_(host_slots[:bs], non_blocking=True)
        self.block_tables[:bs].copy_(host_tables[:bs], non_blocking=True)

    def _context(self, bs: int, has_lora: bool) -> ForwardContext:
        attn = AttentionMeta(slot_mapping=self.dev_i64[2, :bs], block_tables=self.block_tables[:bs],
                             seq_lens=self.dev_i64[3, :bs], query_lens=self.query_lens[:bs],
                             query_index=self.query_index[:bs], query_start_loc=self.query_start_loc[:bs + 1],
                             max_query_len=1)
        lora = None
        if has_lora:
            lora = LoRABatchMeta(token_slots=self.token_slots[:bs], seg_starts=self.seg_starts[:bs + 1],
                                 seg_slots=self.token_slots[:bs], num_tokens=bs, num_segs=bs, max_seg_len=1,
                                 no_lora=False)
        return ForwardContext(attn, lora)

    def _forward(self, bs: int, has_lora: bool) -> None:
        source = self.dev_i64[4, :bs]
        input_ids = torch.where(source >= 0, self.last_sampled[source.clamp(min=0)], self.dev_i64[0, :bs])
        with forward_context(self._context(bs, has_lora)):
            hidden = self.model(input_ids, self.dev_i64[1, :bs])
        skinny_linear(hidden, self.model.lm_head.weight, out=self.logits[:bs])
        torch.argmax(self.logits[:bs], dim=-1, out=self.greedy[:bs])

    def _capture(self, bs: int, has_lora: bool) -> torch.cuda.CUDAGraph:
        self._reset_inputs(bs)
        self._forward(bs, has_lora)  # warm-up: compiles kernels, settles the allocator
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(bs, has_lora)
        if self.pool is None:
            self.pool = graph.pool()
        return graph

    def _reset_inputs(self, bs: int) -> None:
        """Valid padding rows for warm-up and capture (they write only the dummy block)."""
        self.dev_i64[:, :bs] = torch.from_numpy(self._padding).to(self.dev_i64.device)
        self.token_slots[:bs] = -1
        self.block_tables[:bs] = self.dummy_block
