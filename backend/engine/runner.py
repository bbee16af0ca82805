"""Turns a ``SchedulerOutput`` into tensors, runs the model over the paged cache,
and samples. The only module that touches the KV-cache tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.backend.engine.cuda_graphs import DecodeBatch, DecodeGraphs
from loraplex.backend.engine.sampler import Sampler, SamplingBatch, make_generator, prompt_logprobs
from loraplex.backend.engine.scheduler import SchedulerOutput
from loraplex.backend.engine.sequence import Sequence
from loraplex.backend.engine.structured import apply_grammar_bitmask
from loraplex.backend.layers.context import AttentionMeta, ForwardContext, forward_context
from loraplex.backend.models.llama import DecoderModel
from loraplex.backend.outputs import Logprob
from loraplex.kernels.lora import LoRABatchMeta


@dataclass
class StepInputs:
    input_ids: torch.Tensor | None  # [T]; None when the step replays a captured decode graph
    positions: torch.Tensor | None  # [T]
    attn: AttentionMeta | None
    token_slots: list[int]  # [T] LoRA slot per token, -1 = base
    sample_rows: list[int]  # row in the flat batch of each sampling sequence's last token
    sample_seqs: list[Sequence]
    # request id -> (rows of prompt positions in this chunk, the prompt tokens they predict, top-k)
    prompt_rows: dict[str, tuple[list[int], list[int], int]] = field(default_factory=dict)
    decode: DecodeBatch | None = None  # set for a decode-only step that a captured graph can run


@dataclass
class StepResult:
    sampled: dict[str, int]  # request id -> new token
    logprobs: dict[str, Logprob | None]
    prompt_logprobs: dict[str, list[Logprob]]  # request id -> logprobs of prompt tokens in this chunk


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, seed: int, cuda_graphs: bool = False, max_model_len: int = 0,
                 max_num_seqs: int = 1):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.spec.vocab_size
        self.generators: dict[str, torch.Generator] = {}
        self.sampler = Sampler(make_generator(seed, device))
        self._allocate_kv(num_blocks + 1, dtype)  # + one dummy block for padded rows of captured steps
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and device.type == "cuda":
            self.graphs = DecodeGraphs(model, block_size, num_blocks, -(-max_model_len // block_size),
                                       max_num_seqs, device)

    @staticmethod
    def bytes_per_block(model: DecoderModel, block_size: int, dtype: torch.dtype) -> int:
        spec = model.spec
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem

    def _allocate_kv(self, num_blocks: int, dtype: torch.dtype) -> None:
        spec = self.model.spec
        shape = (spec.num_layers, 2, num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache = self.kv_cache[i, 0]
            layer.self_attn.v_cache = self.kv_cache[i, 1]

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    # ---- one step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, slot_of: dict[tuple[str, int], int]) -> StepResult:
        inputs = self._prepare(out, slot_of)
        if inputs.decode is not None:
            assert self.graphs is not None
            hidden = self.graphs.run(inputs.decode)
        else:
            hidden = self._forward_eager(inputs)
        result = StepResult({}, {}, {})
        self._prompt_logprobs(hidden, inputs, result)
        if inputs.sample_seqs:
            self._sample(hidden, inputs, result)
        return result

    def _forward_eager(self, inputs: StepInputs) -> torch.Tensor:
        assert inputs.input_ids is not None and inputs.positions is not None and inputs.attn is not None
        lora_meta = None
        if any(s >= 0 for s in inputs.token_slots):
            lora_meta = LoRABatchMeta.build(inputs.token_slots, self.device)
        with forward_context(ForwardContext(inputs.attn, lora_meta)):
            return self.model(inputs.input_ids, inputs.positions)

    def _prepare(self, out: SchedulerOutput, slot_of: dict[tuple[str, int], int]) -> StepInputs:
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        token_slots: list[int] = []
        query_index: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: dict[str, tuple[list[int], list[int], int]] = {}
        max_q = max(s.num_new_tokens for s in out.scheduled)
        bs = self.block_size
        for b, item in enumerate(out.scheduled):
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            row0 = len(ids)
            tokens = [seq.token_at(start)] if n == 1 else seq.all_token_ids[start:start + n]  # decode: no copy
            ids += tokens
            pos += range(start, start + n)
            slots += [seq.block_ids[p // bs] * bs + p % bs for p in range(start, start + n)]
            lora_slot = slot_of[seq.adapter_key] if seq.adapter_key is not None else -1
            token_slots += [lora_slot] * n
            query_index += range(b * max_q, b * max_q + n)
            if seq.params.prompt_logprobs is not None:
                last = min(start + n, seq.num_prompt_tokens - 1)
                if last > start:
                    rows = list(range(row0, row0 + last - start))
                    prompt_rows[seq.request_id] = (rows, seq.prompt_token_ids[start + 1:last + 1],
                                                   seq.params.prompt_logprobs)
            if item.samples:
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        seq_lens = [s.seq.num_computed_tokens + s.num_new_tokens for s in out.scheduled]
        tables_in = [s.seq.block_ids for s in out.scheduled]
        if max_q == 1 and not prompt_rows and self.graphs is not None \
                and self.graphs.fits(len(ids), max(len(t) for t in tables_in)):
            decode = DecodeBatch(ids, pos, slots, tables_in, seq_lens, token_slots)
            return StepInputs(None, None, None, token_slots, sample_rows, sample_seqs, prompt_rows, decode)
        max_blocks = max(len(s.seq.block_ids) for s in out.scheduled)
        tables = [s.seq.block_ids + [0] * (max_blocks - len(s.seq.block_ids)) for s in out.scheduled]
        dev = self.device
        attn = AttentionMeta(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            query_lens=torch.tensor([s.num_new_tokens for s in out.scheduled], dtype=torch.long, device=dev),
            query_index=torch.tensor(query_index, dtype=torch.long, device=dev), max_query_len=max_q)
        return StepInputs(torch.tensor(ids, dtype=torch.long, device=dev),
                          torch.tensor(pos, dtype=torch.long, device=dev), attn, token_slots, sample_rows,
                          sample_seqs, prompt_rows)

    def _sample(self, hidden: torch.Tensor, inputs: StepInputs, result: StepResult) -> None:
        seqs = inputs.sample_seqs
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        apply_grammar_bitmask(logits, seqs)  # constrained rows: forbidden tokens -> -inf, before sampling
        generators = [self._generator(s) for s in seqs]
        batch = SamplingBatch.build([s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                                    [s.output_token_ids for s in seqs], generators, self.vocab_size, self.device)
        sampled = self.sampler(logits, batch)
        for seq, token, lp in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            result.sampled[seq.request_id] = token
            result.logprobs[seq.request_id] = lp

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs, result: StepResult) -> None:
        for request_id, (rows, next_ids, k) in inputs.prompt_rows.items():
            logits = self.model.compute_logits(hidden[rows])
            result.prompt_logprobs[request_id] = prompt_logprobs(
                logits, torch.tensor(next_ids, device=logits.device), k)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        gen = self.generators.get(seq.request_id)
        if gen is None:
            gen = self.generators[seq.request_id] = make_generator(seq.params.seed, self.device)
        return gen
