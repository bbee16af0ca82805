"""The runner's persistent view of the requests it runs, and one step's flat inputs built from it.

The runner keeps each request's tokens, sampling parameters and block table
(``RequestState``, one row of a host block table); a ``SchedulerOutput`` only
brings what changed. A step's inputs are built with numpy over those rows,
never by walking Python lists token by token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loraplex.backend.engine.scheduler import ScheduledRequest, SchedulerOutput
from loraplex.backend.sampling_params import SamplingParams


@dataclass
class RequestState:
    """What the runner remembers of one request between steps."""

    token_ids: list[int]  # prompt + output tokens
    num_prompt_tokens: int
    params: SamplingParams
    row: int  # its row in the host block table
    early_stop_ids: list[int] = field(default_factory=list)  # masked until params.min_tokens outputs
    structured: Any = None  # the request's grammar matcher (structured output), advanced by the engine
    num_blocks: int = 0
    generator: torch.Generator | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def blocked_tokens(self) -> list[int]:
        """Ids the sampler must not pick now: EOS and stop ids while fewer than min_tokens are out."""
        if len(self.token_ids) - self.num_prompt_tokens < self.params.min_tokens:
            return self.early_stop_ids
        return []


@dataclass
class StepInputs:
    """One step's flat batch on the host (numpy), T tokens of B requests."""

    requests: list[ScheduledRequest]
    states: list[RequestState]
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64: cache slot of each new token
    block_tables: np.ndarray  # [B, max_blocks] int32
    seq_lens: np.ndarray  # [B] int64: context length after this step
    query_lens: np.ndarray  # [B] int64
    token_slots: np.ndarray  # [T] int32: LoRA slot per token, -1 = base
    sample_rows: list[int]  # row of each sampling request's last token
    # request id -> (rows of prompt positions in this chunk, the prompt tokens they predict, top-k)
    prompt_rows: dict[str, tuple[list[int], list[int], int]] = field(default_factory=dict)

    @property
    def is_decode(self) -> bool:
        """One token per request, each sampling: a step a captured graph can run."""
        return len(self.input_ids) == len(self.requests) and not self.prompt_rows

    @property
    def max_query_len(self) -> int:
        return int(self.query_lens.max())

    def query_start_loc(self) -> np.ndarray:
        """[B+1] int32 cumulative query lengths."""
        return np.concatenate(([0], np.cumsum(self.query_lens))).astype(np.int32)

    def query_index(self) -> np.ndarray:
        """[T] int64: b * max_query_len + i (the torch reference attention's padded layout)."""
        loc = self.query_start_loc()[:-1].astype(np.int64)
        b = np.repeat(np.arange(len(self.requests), dtype=np.int64), self.query_lens)
        return b * self.max_query_len + np.arange(len(self.input_ids), dtype=np.int64) - np.repeat(loc,
                                                                                                     self.query_lens)


def _chunk(token_ids: list[int], r: ScheduledRequest) -> list[int]:
    chunk = token_ids[r.start:r.start + r.num_new_tokens]
    return chunk + [-1] * (r.num_new_tokens - len(chunk))


class RequestTable:
    """Every request the runner knows, with a host block table row each."""

    def __init__(self, max_rows: int, max_blocks: int, block_size: int):
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.block_table = np.zeros((max_rows, max_blocks), dtype=np.int32)
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.states: dict[str, RequestState] = {}

    def update(self, out: SchedulerOutput) -> None:
        """Drops finished requests, (re)builds new ones, appends new blocks."""
        for request_id in out.finished_req_ids:
            self.drop(request_id)
        for r in out.requests:
            if r.new is not None:  # new, or resumed after a preemption (its seeded generator carries on)
                old = self.states.get(r.request_id)
                self.drop(r.request_id)
                self._grow_rows()
                self.states[r.request_id] = RequestState(
                    r.new.prompt_token_ids + r.new.output_token_ids, len(r.new.prompt_token_ids), r.new.params,
                    self.free_rows.pop(), r.new.early_stop_ids, r.new.structured,
                    generator=old.generator if old is not None else None)
            state = self.states[r.request_id]
            if r.new_block_ids:
                n = len(r.new_block_ids)
                self.block_table[state.row, state.num_blocks:state.num_blocks + n] = r.new_block_ids
                state.num_blocks += n

    def drop(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None:
            self.free_rows.append(state.row)

    def _grow_rows(self) -> None:
        if not self.free_rows:  # more requests alive than planned (preempted ones keep rows until resumed)
            n = len(self.block_table)
            self.block_table = np.concatenate([self.block_table, np.zeros_like(self.block_table)])
            self.free_rows = list(range(2 * n - 1, n - 1, -1))

    def build(self, out: SchedulerOutput) -> StepInputs:
        reqs = out.requests
        states = [self.states[r.request_id] for r in reqs]
        b = len(reqs)
        query_lens = np.fromiter((r.num_new_tokens for r in reqs), dtype=np.int64, count=b)
        starts = np.fromiter((r.start for r in reqs), dtype=np.int64, count=b)
        t = int(query_lens.sum())
        # a token sampled last step may still be on the device: -1 here, the runner fills it in there
        if t == b:  # decode: one token each
            ids = [s.token_ids[r.start] if r.start < len(s.token_ids) else -1 for r, s in zip(reqs, states, strict=True)]
            positions = starts
        else:
            ids = [tok for r, s in zip(reqs, states, strict=True) for tok in _chunk(s.token_ids, r)]
            offsets = np.arange(t, dtype=np.int64) - np.repeat(np.cumsum(query_lens) - query_lens, query_lens)
            positions = np.repeat(starts, query_lens) + offsets
        seq_lens = starts + query_lens
        rows = np.fromiter((s.row for s in states), dtype=np.int64, count=b)
        width = max(1, -(-int(seq_lens.max()) // self.block_size))
        tables = self.block_table[rows, :width]
        token_rows = np.repeat(np.arange(b), query_lens) if t != b else np.arange(b)
        bs = self.block_size
        slot_mapping = tables[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        lora = np.fromiter((r.lora_slot for r in reqs), dtype=np.int32, count=b)
        ends = np.cumsum(query_lens) - 1
        sample_rows = [int(ends[i]) for i, r in enumerate(reqs) if r.samples]
        inputs = StepInputs(reqs, states, np.asarray(ids, dtype=np.int64), positions, slot_mapping, tables,
                            seq_lens, query_lens, np.repeat(lora, query_lens) if t != b else lora, sample_rows)
        self._prompt_rows(inputs, ends - query_lens + 1)
        return inputs

    @staticmethod
    def _prompt_rows(inputs: StepInputs, first_rows: np.ndarray) -> None:
        for i, (r, s) in enumerate(zip(inputs.requests, inputs.states, strict=True)):
            if s.params.prompt_logprobs is None:
                continue
            last = min(r.start + r.num_new_tokens, s.num_prompt_tokens - 1)
            if last > r.start:
                row0 = int(first_rows[i])
                inputs.prompt_rows[r.request_id] = (list(range(row0, row0 + last - r.start)),
                                                    s.token_ids[r.start + 1:last + 1], s.params.prompt_logprobs)
