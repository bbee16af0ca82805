"""Whole steps captured in CUDA graphs at start-up and replayed.

Decode steps (``DecodeGraphs``): one graph per (batch bucket, with/without LoRA) runs
the model, the LM head and the greedy argmax over persistent input buffers; a step
fills the buffers with three host-to-device copies and replays. Attention reads the
paged cache in place, so one graph serves every context length up to
``max_model_len``. Padded rows write their K/V into a dummy block that the block
manager never hands out.

Prefill and mixed steps (``StepGraphs``): one graph per (token bucket, with/without
LoRA) serves every mix of prompt chunks and decodes of up to that many tokens. Their
attention takes its programs from a tile map the host fills (``fill_tile_map``), so
launch sizes depend on shapes only; LoRA builds its SGMV tile table on the device.
Padding tokens form one extra sequence, last, over the dummy block. Eagerly such a
step costs one host launch per kernel (several hundred, ~5-80 us each), far more than
the GPU's own time for a few hundred tokens of a small model.
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
from loraplex.kernels.lora_plan import LoRAPlan

try:
    from loraplex.kernels.attention_triton import fill_tile_map, max_tile_entries, prefill_block_q
except ImportError:  # no Triton: the torch attention path ignores tile maps
    fill_tile_map = max_tile_entries = prefill_block_q = None  # type: ignore[assignment]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
SGMV_GRAPH_TOKENS = 64  # LoRA in a step graph of at least this many tokens: SGMV tiles of 16 rows, else BGMV


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


class StepGraphs:
    """Prefill and mixed steps of up to ``max_tokens`` tokens, captured per token bucket (module docstring).

    Sequences: up to ``max_seqs`` real ones, then rows with no query, then the padding sequence (row
    ``max_seqs``), whose tokens fill the bucket: position 0, the dummy block, no adapter, never sampled.
    Until ``capture_all`` (never on CPU: tests) ``run`` executes the same padded forward eagerly."""

    def __init__(self, model: DecoderModel, block_size: int, dummy_block: int, max_blocks_per_seq: int,
                 max_seqs: int, max_tokens: int, device: torch.device, with_lora: bool, last_sampled: torch.Tensor):
        self.model = model
        self.block_size, self.dummy_block, self.max_blocks = block_size, dummy_block, max_blocks_per_seq
        self.buckets = [t for t in TOKEN_BUCKETS if t < max_tokens] + [max_tokens]
        self.lora_modes = (False, True) if with_lora else (False,)
        self.last_sampled = last_sampled
        spec = model.spec
        dtype = model.lm_head.weight.dtype
        self.block_q = prefill_block_q(spec.num_heads, spec.num_kv_heads, spec.head_dim, dtype) \
            if prefill_block_q is not None else 16
        t, s = self.buckets[-1], max_seqs + 1  # + the padding sequence
        self.max_seqs = max_seqs
        self.num_tiles = {b: max_tile_entries(b, max_seqs, self.block_q) if max_tile_entries is not None else 1
                          for b in self.buckets}
        nt = self.num_tiles[t]
        # host staging (pinned on CUDA), two sets used alternately (see DecodeGraphs): token rows = input
        # ids, positions, cache slots, source row in last_sampled, torch path's query index; sequence
        # rows = context lengths, query lengths; sample rows; int32: token slots, query starts, tile map,
        # block tables
        pin = device.type == "cuda"
        self.staging = [dict(tok=torch.zeros((5, t), dtype=torch.int64, pin_memory=pin),
                             seq=torch.zeros((2, s), dtype=torch.int64, pin_memory=pin),
                             sample=torch.zeros(s, dtype=torch.int64, pin_memory=pin),
                             slots=torch.full((t,), -1, dtype=torch.int32, pin_memory=pin),
                             qsl=torch.zeros(s + 1, dtype=torch.int32, pin_memory=pin),
                             tiles=torch.full((nt, 2), -1, dtype=torch.int32, pin_memory=pin),
                             tables=torch.full((s, self.max_blocks), dummy_block, dtype=torch.int32, pin_memory=pin))
                        for _ in range(2)]
        self.num_fills = 0
        self.dev = {k: torch.empty_like(v, device=device) for k, v in self.staging[0].items()}
        self.logits = torch.empty((s, model.lm_head.weight.shape[0]), dtype=dtype, device=device)
        self.greedy = torch.zeros(s, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.pool: Any = None
        self.capture_seconds = 0.0
        self.graph_memory_bytes = 0
        for staging in self.staging:
            self._fill_padding(staging, t, 0, 0)
        for k, v in self.dev.items():
            v.copy_(self.staging[0][k])

    def fits(self, inputs: StepInputs) -> bool:
        return (len(inputs.input_ids) <= self.buckets[-1] and len(inputs.requests) <= self.max_seqs
                and not inputs.prompt_rows)

    def capture_all(self) -> None:
        """Captures every bucket, largest first (smaller ones reuse its memory pool)."""
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        for has_lora in self.lora_modes:
            for t in reversed(self.buckets):
                self._forward(t, has_lora)  # warm-up: compiles kernels, settles the allocator
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._forward(t, has_lora)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[(t, has_lora)] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        self.graph_memory_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])

    def run(self, inputs: StepInputs, source: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fills the buffers and replays (or runs) the step's bucket; returns (logits, greedy ids) of
        the sampling rows, in ``inputs.sample_rows`` order, as views of static buffers."""
        t = next(x for x in self.buckets if x >= len(inputs.input_ids))
        has_lora = bool((inputs.token_slots >= 0).any()) and True in self.lora_modes
        self._fill(inputs, t, source)
        graph = self.graphs.get((t, has_lora))
        if graph is not None:
            graph.replay()
        else:
            self._forward(t, has_lora)
        n = len(inputs.sample_rows)
        return self.logits[:n], self.greedy[:n]

    def _fill_padding(self, staging: dict[str, torch.Tensor], t: int, n: int, b: int) -> None:
        """Tokens n..t-1 as the padding sequence, sequence rows b..S-2 empty."""
        tok, seq = staging["tok"].numpy(), staging["seq"].numpy()
        pad = self.max_seqs
        tok[:, n:t] = np.array([[0], [0], [self.dummy_block * self.block_size], [-1], [0]])
        tok[4, n:t] = pad * t + np.arange(t - n)  # torch path: row pad of a [S, t] query grid
        seq[:, b:pad] = 0
        seq[:, pad] = t - n
        qsl = staging["qsl"].numpy()
        qsl[b + 1:pad + 1] = n
        qsl[pad + 1] = t
        staging["slots"].numpy()[n:t] = -1

    def _fill(self, inputs: StepInputs, t: int, source: np.ndarray | None) -> None:
        staging = self.staging[self.num_fills % 2]
        self.num_fills += 1
        n, b = len(inputs.input_ids), len(inputs.requests)
        tok = staging["tok"].numpy()
        tok[0, :n], tok[1, :n], tok[2, :n] = inputs.input_ids, inputs.positions, inputs.slot_mapping
        tok[3, :n] = -1 if source is None else source
        offsets = np.arange(n) - np.repeat(np.cumsum(inputs.query_lens) - inputs.query_lens, inputs.query_lens)
        tok[4, :n] = np.repeat(np.arange(b), inputs.query_lens) * t + offsets
        seq = staging["seq"].numpy()
        seq[0, :b], seq[1, :b] = inputs.seq_lens, inputs.query_lens
        qsl = staging["qsl"].numpy()
        qsl[0] = 0
        qsl[1:b + 1] = np.cumsum(inputs.query_lens)
        self._fill_padding(staging, t, n, b)
        sample = staging["sample"].numpy()
        sample[:len(inputs.sample_rows)] = inputs.sample_rows
        sample[len(inputs.sample_rows):] = 0  # rows past them are computed too: any valid token row
        staging["slots"].numpy()[:n] = inputs.token_slots
        if fill_tile_map is not None:
            fill_tile_map(inputs.query_lens, self.block_q, staging["tiles"].numpy()[:self.num_tiles[t]])
        tables = staging["tables"].numpy()
        width = inputs.block_tables.shape[1]
        tables[:b, :width] = inputs.block_tables
        tables[:b, width:] = self.dummy_block
        s = self.max_seqs + 1
        parts = (("tok", np.s_[:, :t]), ("seq", np.s_[:, :s]), ("sample", np.s_[:s]), ("slots", np.s_[:t]),
                 ("qsl", np.s_[:s + 1]), ("tiles", np.s_[:self.num_tiles[t]]), ("tables", np.s_[:b]))
        for key, rows in parts:
            self.dev[key][rows].copy_(staging[key][rows], non_blocking=True)

    def _context(self, t: int, has_lora: bool) -> ForwardContext:
        d = self.dev
        attn = AttentionMeta(slot_mapping=d["tok"][2, :t], block_tables=d["tables"], seq_lens=d["seq"][0],
                             query_lens=d["seq"][1], query_index=d["tok"][4, :t], query_start_loc=d["qsl"],
                             max_query_len=t, tiles=d["tiles"][:self.num_tiles[t]])
        lora = None
        if has_lora:
            plan = LoRAPlan("sgmv", 16) if t >= SGMV_GRAPH_TOKENS else LoRAPlan("bgmv", 16)
            lora = LoRABatchMeta.on_device(d["slots"][:t], plan)
        return ForwardContext(attn, lora)

    def _forward(self, t: int, has_lora: bool) -> None:
        d = self.dev
        source = d["tok"][3, :t]
        input_ids = torch.where(source >= 0, self.last_sampled[source.clamp(min=0)], d["tok"][0, :t])
        with forward_context(self._context(t, has_lora)):
            hidden = self.model(input_ids, d["tok"][1, :t])
        rows = min(t, len(self.greedy))
        skinny_linear(hidden[d["sample"][:rows]], self.model.lm_head.weight, out=self.logits[:rows])
        torch.argmax(self.logits[:rows], dim=-1, out=self.greedy[:rows])
