"""Runs one step: ``SchedulerOutput`` in, sampled tokens out. The only module that
touches the KV-cache tensors.

The runner keeps its own view of every request (``RequestTable``); a scheduler
output brings only what changed. On CUDA, decode steps replay a captured CUDA
graph (model, LM head and greedy argmax), and so do prefill and mixed steps of up
to ``max_capture_tokens`` tokens (``StepGraphs``, one graph per token bucket); the
rest (longer steps, prompt logprobs) runs eagerly. Sampled ids come back with one
device-to-host copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from loraplex.backend.engine.cuda_graphs import DecodeGraphs, StepGraphs
from loraplex.backend.engine.sampler import Sampler, SamplingBatch, make_generator, prompt_logprobs
from loraplex.backend.engine.scheduler import SchedulerOutput
from loraplex.backend.engine.step_inputs import RequestState, RequestTable, StepInputs
from loraplex.backend.engine.structured import apply_grammar_bitmask
from loraplex.backend.layers.context import AttentionMeta, ForwardContext, forward_context
from loraplex.backend.models.llama import DecoderLayer, DecoderModel
from loraplex.backend.outputs import Logprob
from loraplex.backend.sampling_params import SamplingParams
from loraplex.kernels import gemv
from loraplex.kernels.lora import DEFAULT_RANK, LoRABatchMeta


@dataclass
class StepResult:
    sampled: dict[str, int]  # request id -> new token
    logprobs: dict[str, Logprob | None]
    prompt_logprobs: dict[str, list[Logprob]]  # request id -> logprobs of prompt tokens in this chunk


class StepHandle:
    """A launched step: its sampled tokens arrive through one non-blocking device-to-host copy."""

    def __init__(self, runner: ModelRunner, request_ids: list[str], states: list[RequestState],
                 prompt_logprobs: dict[str, list[Logprob]]):
        self.runner = runner
        self.request_ids, self.states = request_ids, states
        self.prompt_logprobs = prompt_logprobs
        self.tokens: list[int] | None = None  # known at launch when the sampler ran on the host's behalf
        self.logprobs: list[Logprob | None] | None = None
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        # (logits, greedy, inputs) of a step whose sampling waits for its grammars (``complete``)
        self._deferred: tuple[torch.Tensor, torch.Tensor | None, StepInputs] | None = None

    def complete(self) -> None:
        """Samples a step launched with ``defer``: its grammar matchers have now seen the previous
        step's tokens, so the bitmasks are filled while the device was already running this step."""
        if self._deferred is not None:
            logits, greedy, inputs = self._deferred
            self._deferred = None
            with torch.inference_mode():  # the logits are inference tensors, masked in place
                self.runner._sample(logits, greedy, inputs, self)

    def copy_to_host(self, ids: torch.Tensor) -> None:
        """Starts the copy; on CPU a snapshot, read in ``result()`` (the same overlapped path as on CUDA)."""
        if self.runner.device.type != "cuda":
            self._host = ids.clone()
            return
        self._host = torch.empty(ids.shape[0], dtype=torch.int64, pin_memory=True)
        self._host.copy_(ids, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def result(self) -> StepResult:
        """Waits for the tokens; appends them to the runner's view of each request."""
        if self.tokens is None and self._host is not None:
            if self._event is not None:
                self._event.synchronize()
            self.tokens = self._host.tolist()
        tokens = self.tokens or []
        logprobs = self.logprobs or [None] * len(tokens)
        for state, token in zip(self.states, tokens, strict=True):
            state.token_ids.append(token)
        return StepResult(dict(zip(self.request_ids, tokens, strict=True)),
                          dict(zip(self.request_ids, logprobs, strict=True)), self.prompt_logprobs)

    @property
    def overlappable(self) -> bool:
        """Nothing of this step needs the host before the next step is launched."""
        return self.tokens is None or not self.request_ids


def take_pending(input_ids: torch.Tensor, source: torch.Tensor, last_sampled: torch.Tensor) -> torch.Tensor:
    """input_ids[t] = last_sampled[source[t]] where source[t] >= 0 (tokens still on the device)."""
    return torch.where(source >= 0, last_sampled[source.clamp(min=0)], input_ids)


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, seed: int, cuda_graphs: bool = False, max_model_len: int = 0,
                 max_num_seqs: int = 1, with_lora: bool = False, max_capture_tokens: int = 0):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.spec.vocab_size
        self.sampler = Sampler(make_generator(seed, device))
        max_blocks = max(1, -(-max_model_len // block_size))
        self.table = RequestTable(max(2 * max_num_seqs, 8), max_blocks, block_size)
        self._allocate_kv(num_blocks + 1, dtype)  # + one dummy block for padded rows of captured steps
        self.graphs: DecodeGraphs | None = None
        self.step_graphs: StepGraphs | None = None  # prefill and mixed steps of up to max_capture_tokens
        self.last_sampled = torch.zeros(max(2 * max_num_seqs, 8), dtype=torch.int64, device=device)
        with torch.inference_mode():
            gemv.warm_up(p for p in model.parameters() if p.dim() == 2)  # skinny-GEMM kernels compile now
            self._warm_up_attention()
        if cuda_graphs and device.type == "cuda":
            # decode graphs first, in their own memory pool, exactly as without step graphs: captured into
            # the step graphs' pool after them, batch-1 decode ran 7% slower on the H200 (call I, not
            # understood); the step graphs get a pool of their own
            self.graphs = DecodeGraphs(model, block_size, num_blocks, max_blocks, max_num_seqs, device, with_lora,
                                       self.last_sampled)
            self.graphs.capture_all()
            if max_capture_tokens > 0:
                self.step_graphs = StepGraphs(model, block_size, num_blocks, max_blocks, max_num_seqs,
                                              max_capture_tokens, device, with_lora, self.last_sampled)
                self.step_graphs.capture_all()
        self._pending_rows: dict[str, int] = {}  # request id -> its row in last_sampled (the last step's token)
        # the slot stacks' max rank R, which the LoRA layers plan their kernels for: eager steps build
        # the tile table for it up front (else the first layer builds and uploads another one)
        self.lora_rank = next((m.lora_b.shape[2] for *_, m in model.lora_linears() if m.lora_b is not None),
                              DEFAULT_RANK)

    def _warm_up_attention(self) -> None:
        """Every attention variant compiles now, once per distinct layer configuration: a variant first
        met while serving would stall its step by a compile (~0.1 s to 1 s)."""
        seen = set()
        for layer in cast("list[DecoderLayer]", self.model.layers):
            attn = layer.self_attn.attn
            key = (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.sliding_window)
            if key not in seen:
                seen.add(key)
                attn.warm_up()

    @staticmethod
    def bytes_per_block(model: DecoderModel, block_size: int, dtype: torch.dtype) -> int:
        spec = model.spec
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem

    def _allocate_kv(self, num_blocks: int, dtype: torch.dtype) -> None:
        spec = self.model.spec
        shape = (spec.num_layers, 2, num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        for i, layer in enumerate(cast("list[DecoderLayer]", self.model.layers)):
            layer.self_attn.attn.bind_cache(self.kv_cache[i, 0], self.kv_cache[i, 1])

    # ---- one step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Runs one step and waits for its tokens."""
        return self.launch(out).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, defer: bool = False) -> StepHandle:
        """Enqueues one step on the device and returns at once when its sampling needs nothing from the
        host (greedy rows without logprobs or penalties); ``result()`` waits for the tokens. A decode row
        whose previous token is still on its way reads it from the device (``last_sampled``).

        With ``defer``, a step with grammar-constrained rows returns after enqueuing the forward pass:
        the caller advances the matchers with the previous step's tokens, then ``handle.complete()``
        fills the bitmasks and samples (vLLM's overlap of bitmask filling with the forward pass)."""
        self.table.update(out)
        handle = StepHandle(self, [], [], {})
        if not out.requests:
            return handle
        inputs = self.table.build(out)
        source = self._pending_sources(inputs)
        logits: torch.Tensor | None
        greedy: torch.Tensor | None
        if inputs.is_decode and self.graphs is not None and self.graphs.fits(len(inputs.requests)):
            logits, greedy = self.graphs.run(inputs, source)
        elif self.step_graphs is not None and self.step_graphs.fits(inputs):
            logits, greedy = self.step_graphs.run(inputs, source)
        else:
            hidden = self._forward_eager(inputs, source)
            for request_id, (rows, next_ids, k) in inputs.prompt_rows.items():
                handle.prompt_logprobs[request_id] = prompt_logprobs(
                    self.model.compute_logits(hidden[rows]), torch.tensor(next_ids, device=hidden.device), k)
            logits = self.model.compute_logits(hidden[inputs.sample_rows]) if inputs.sample_rows else None
            greedy = None
        if inputs.sample_rows:
            assert logits is not None
            handle._deferred = (logits, greedy, inputs)
            if not (defer and any(inputs.states[i].structured is not None
                                  for i, r in enumerate(inputs.requests) if r.samples)):
                handle.complete()
        return handle

    def _pending_sources(self, inputs: StepInputs) -> np.ndarray | None:
        """[T] row of ``last_sampled`` holding each token whose value the host does not know yet, else -1."""
        if not self._pending_rows:
            return None
        source = np.full(len(inputs.input_ids), -1, dtype=np.int64)
        ends = np.cumsum(inputs.query_lens) - 1
        for i, r in enumerate(inputs.requests):
            row = self._pending_rows.get(r.request_id)
            if row is not None and r.start + r.num_new_tokens > len(inputs.states[i].token_ids):
                source[ends[i]] = row
        return source if (source >= 0).any() else None

    def _forward_eager(self, inputs: StepInputs, source: np.ndarray | None) -> torch.Tensor:
        dev = self.device

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        attn = AttentionMeta(slot_mapping=put(inputs.slot_mapping), block_tables=put(inputs.block_tables),
                             seq_lens=put(inputs.seq_lens), query_lens=put(inputs.query_lens),
                             query_index=put(inputs.query_index()), query_start_loc=put(inputs.query_start_loc()),
                             max_query_len=inputs.max_query_len)
        lora = None
        if (inputs.token_slots >= 0).any():
            lora = LoRABatchMeta.build(inputs.token_slots, dev, rank=self.lora_rank)
        input_ids = put(inputs.input_ids)
        if source is not None:
            input_ids = take_pending(input_ids, put(source), self.last_sampled)
        with forward_context(ForwardContext(attn, lora)):
            return self.model(input_ids, put(inputs.positions))

    def _sample(self, logits: torch.Tensor, greedy: torch.Tensor | None, inputs: StepInputs,
                handle: StepHandle) -> None:
        """logits: [R, V] of the sampling rows; greedy: their argmax when the graph computed it."""
        rows = [i for i, r in enumerate(inputs.requests) if r.samples]
        states = [inputs.states[i] for i in rows]
        handle.request_ids = [inputs.requests[i].request_id for i in rows]
        handle.states = states
        params = [s.params for s in states]
        blocked = [s.blocked_tokens() for s in states]
        constrained = any(s.structured is not None for s in states)
        if constrained:  # forbidden tokens -> -inf before sampling (the graph's argmax is then stale)
            logits = logits.float()
            apply_grammar_bitmask(logits, states)
        if all(_plain_greedy(p) for p in params) and not any(blocked):
            ids = greedy if greedy is not None and not constrained else logits.argmax(dim=-1)
        else:
            generators = [self._generator(s) for s in states]
            batch = SamplingBatch.build(params, [s.prompt_token_ids for s in states],
                                        [s.output_token_ids for s in states], generators, self.vocab_size,
                                        self.device, blocked=blocked)
            sampled = self.sampler(logits.float(), batch)
            handle.tokens, handle.logprobs = sampled.token_ids, sampled.logprobs
            ids = torch.tensor(sampled.token_ids, dtype=torch.int64, device=self.device)
        self.last_sampled[:len(rows)].copy_(ids)
        self._pending_rows = dict(zip(handle.request_ids, range(len(rows)), strict=True))
        if handle.tokens is None:
            handle.copy_to_host(ids)

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
