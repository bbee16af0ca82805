"""Runs one step: ``SchedulerOutput`` in, sampled tokens out. The only module that
touches the KV-cache tensors.

The runner keeps its own view of every request (``RequestTable``); a scheduler
output brings only what changed. Decode steps replay a captured CUDA graph
(model, LM head and greedy argmax); other steps run eagerly. Sampled ids come
back with one device-to-host copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loraplex.backend.engine.cuda_graphs import DecodeGraphs
from loraplex.backend.engine.sampler import Sampler, SamplingBatch, make_generator, prompt_logprobs
from loraplex.backend.engine.scheduler import SchedulerOutput
from loraplex.backend.engine.step_inputs import RequestState, RequestTable, StepInputs
from loraplex.backend.layers.context import AttentionMeta, ForwardContext, forward_context
from loraplex.backend.models.llama import DecoderModel
from loraplex.backend.outputs import Logprob
from loraplex.backend.sampling_params import SamplingParams
from loraplex.kernels.lora import LoRABatchMeta


@dataclass
class StepResult:
    sampled: dict[str, int]  # request id -> new token
    logprobs: dict[str, Logprob | None]
    prompt_logprobs: dict[str, list[Logprob]]  # request id -> logprobs of prompt tokens in this chunk


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, seed: int, cuda_graphs: bool = False, max_model_len: int = 0,
                 max_num_seqs: int = 1, with_lora: bool = False):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.spec.vocab_size
        self.sampler = Sampler(make_generator(seed, device))
        max_blocks = max(1, -(-max_model_len // block_size))
        self.table = RequestTable(max(2 * max_num_seqs, 8), max_blocks, block_size)
        self._allocate_kv(num_blocks + 1, dtype)  # + one dummy block for padded rows of captured steps
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and device.type == "cuda":
            self.graphs = DecodeGraphs(model, block_size, num_blocks, max_blocks, max_num_seqs, device, with_lora)
            self.graphs.capture_all()
        self._host_ids = torch.zeros(max(max_num_seqs, 1), dtype=torch.int64,
                                     pin_memory=device.type == "cuda")
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

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
            layer.self_attn.attn.bind_cache(self.kv_cache[i, 0], self.kv_cache[i, 1])

    # ---- one step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        self.table.update(out)
        result = StepResult({}, {}, {})
        if not out.requests:
            return result
        inputs = self.table.build(out)
        if inputs.is_decode and self.graphs is not None and self.graphs.fits(len(inputs.requests)):
            logits, greedy = self.graphs.run(inputs)
        else:
            hidden = self._forward_eager(inputs)
            self._prompt_logprobs(hidden, inputs, result)
            logits = self.model.compute_logits(hidden[inputs.sample_rows]) if inputs.sample_rows else None
            greedy = None
        if inputs.sample_rows:
            assert logits is not None
            self._sample(logits, greedy, inputs, result)
        return result

    def _forward_eager(self, inputs: StepInputs) -> torch.Tensor:
        dev = self.device

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        attn = AttentionMeta(slot_mapping=put(inputs.slot_mapping), block_tables=put(inputs.block_tables),
                             seq_lens=put(inputs.seq_lens), query_lens=put(inputs.query_lens),
                             query_index=put(inputs.query_index()), query_start_loc=put(inputs.query_start_loc()),
                             max_query_len=inputs.max_query_len)
        lora = None
        if (inputs.token_slots >= 0).any():
            lora = LoRABatchMeta.build(torch.from_numpy(inputs.token_slots), dev)
        with forward_context(ForwardContext(attn, lora)):
            return self.model(put(inputs.input_ids), put(inputs.positions))

    def _sample(self, logits: torch.Tensor, greedy: torch.Tensor | None, inputs: StepInputs,
                result: StepResult) -> None:
        """logits: [R, V] of the sampling rows; greedy: their argmax when the graph computed it."""
        rows = [i for i, r in enumerate(inputs.requests) if r.samples]
        states = [inputs.states[i] for i in rows]
        params = [s.params for s in states]
        lps: list[Logprob | None] = [None] * len(rows)
        blocked = [s.blocked_tokens() for s in states]
        if all(_plain_greedy(p) for p in params) and not any(blocked):
            ids = greedy if greedy is not None else logits.argmax(dim=-1)
            tokens = self._to_host(ids)
        else:
            generators = [self._generator(s) for s in states]
            batch = SamplingBatch.build(params, [s.prompt_token_ids for s in states],
                                        [s.output_token_ids for s in states], generators, self.vocab_size,
                                        self.device, blocked=blocked)
            sampled = self.sampler(logits.float(), batch)
            tokens, lps = sampled.token_ids, sampled.logprobs
        for i, token, lp in zip(rows, tokens, lps, strict=True):
            request_id = inputs.requests[i].request_id
            inputs.states[i].token_ids.append(token)
            result.sampled[request_id] = token
            result.logprobs[request_id] = lp

    def _to_host(self, ids: torch.Tensor) -> list[int]:
        """One non-blocking device-to-host copy into pinned memory, then a wait on its event."""
        if self._copied is None:
            return ids.tolist()
        n = ids.shape[0]
        if n > self._host_ids.shape[0]:
            self._host_ids = torch.zeros(n, dtype=torch.int64, pin_memory=True)
        host = self._host_ids[:n]
        host.copy_(ids, non_blocking=True)
        self._copied.record()
        self._copied.synchronize()
        return host.tolist()

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs, result: StepResult) -> None:
        for request_id, (rows, next_ids, k) in inputs.prompt_rows.items():
            logits = self.model.compute_logits(hidden[rows])
            result.prompt_logprobs[request_id] = prompt_logprobs(
                logits, torch.tensor(next_ids, device=logits.device), k)

    def _generator(self, state: RequestState) -> torch.Generator | None:
        if state.params.seed is None:
            return None
        if state.generator is None:
            state.generator = make_generator(state.params.seed, self.device)
        return state.generator


def _plain_greedy(p: SamplingParams) -> bool:
    """Greedy with nothing that changes or reports the distribution: the argmax is the answer."""
    return (p.temperature == 0.0 and p.logprobs is None and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0)
