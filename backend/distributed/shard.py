"""Shards a loaded ``DecoderModel`` in place for one tensor-parallel rank (gpt-fast ``tp.py`` style),
and LoRA weights to match it (Punica / S-LoRA style).

Per decoder layer, with H query heads, Hkv KV heads, head size D, MLP width I and N ranks:

- ``qkv_proj`` column-parallel: rank r keeps query heads [r*H/N, (r+1)*H/N) and the KV heads those
  heads read (Hkv/N of them; when Hkv < N, the one KV head its query heads share, replicated over
  N/Hkv ranks). ``gate_up_proj`` column-parallel: I/N rows of gate and of up. Each packed part is
  sliced on its own, so the fused layout stays [q | k | v] and [gate | up] per rank.
- ``o_proj`` and ``down_proj`` row-parallel: the matching input columns; their output (the partial
  sums of every rank) is all-reduced by a forward hook.
- Embedding and LM head vocab-parallel: ceil(V/N) rows per rank (the last padded with zeros);
  the embedding masks ids outside its rows and all-reduces, the LM head all-gathers its logits
  (every rank then holds the full logits, so every rank samples the same token).

LoRA: a column-parallel layer keeps A whole and B's rows of its output slice; a row-parallel
layer keeps A's columns of its input slice and B whole. The row-parallel shrink ``x_r @ A_r.T`` is a
partial sum over ranks and the expand is linear, so ``B @ sum_r(shrink_r) = sum_r(B @ shrink_r)``:
the delta rides in the layer's own output all-reduce, with no collective of its own (zero extra
bytes, against an all-reduce or all-gather of the [T, R] shrink result).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from loraplex.backend.distributed import comm
from loraplex.backend.layers.lora import LoRALinear
from loraplex.backend.models.llama import ArchSpec, DecoderLayer, DecoderModel
from loraplex.errors import ConfigError
from loraplex.lora.peft import LoRAWeights

Axis = Literal["out", "in"]  # which side of a projection is split: its output rows or its input columns


@dataclass(frozen=True)
class ShardPlan:
    """What rank ``rank`` of ``world_size`` keeps of each projection: (axis, start, size) in features."""

    rank: int
    world_size: int
    spec: ArchSpec  # the full model's
    heads: int  # query heads on this rank
    kv_heads: int  # KV heads on this rank (replicated when the model has fewer than world_size)
    kv_start: int  # first KV head of this rank
    inter: int  # MLP width on this rank
    vocab_per_rank: int  # rows of the embedding / LM head per rank (ceil(V/N); the last rank padded)

    @classmethod
    def build(cls, spec: ArchSpec, rank: int, world_size: int) -> ShardPlan:
        check_divisible(spec, world_size)
        heads = spec.num_heads // world_size
        kv_heads = max(1, spec.num_kv_heads // world_size)
        kv_start = rank * heads // (spec.num_heads // spec.num_kv_heads)  # the KV head of its first query head
        return cls(rank, world_size, spec, heads, kv_heads, kv_start, spec.intermediate_size // world_size,
                   -(-spec.vocab_size // world_size))

    def module_slice(self, module: str) -> tuple[Axis, int, int]:
        """(axis, start, size) of one HF projection (``q_proj`` ... ``down_proj``) on this rank."""
        d, r = self.spec.head_dim, self.rank
        q = (r * self.heads * d, self.heads * d)
        kv = (self.kv_start * d, self.kv_heads * d)
        inter = (r * self.inter, self.inter)
        table: dict[str, tuple[Axis, tuple[int, int]]] = {
            "q_proj": ("out", q), "k_proj": ("out", kv), "v_proj": ("out", kv), "o_proj": ("in", q),
            "gate_proj": ("out", inter), "up_proj": ("out", inter), "down_proj": ("in", inter)}
        axis, (start, size) = table[module]
        return axis, start, size

    def local_spec(self) -> ArchSpec:
        """The spec this rank's layers have: its heads, KV heads and MLP width (vocab and hidden whole)."""
        return dataclasses.replace(self.spec, num_heads=self.heads, num_kv_heads=self.kv_heads,
                                   intermediate_size=self.inter)


def check_divisible(spec: ArchSpec, world_size: int) -> None:
    """Refuses a model that ``world_size`` ranks cannot split evenly (before any process starts)."""
    n = world_size
    problems = []
    if spec.num_heads % n:
        problems.append(f"num_attention_heads={spec.num_heads} is not divisible by it")
    if spec.num_kv_heads % n and n % spec.num_kv_heads:
        problems.append(f"num_key_value_heads={spec.num_kv_heads} neither divides nor is divisible by it")
    if spec.intermediate_size % n:
        problems.append(f"intermediate_size={spec.intermediate_size} is not divisible by it")
    if problems:
        raise ConfigError(f"tensor_parallel_size={n}: " + "; ".join(problems))


def _take(t: torch.Tensor, axis: Axis, start: int, size: int) -> torch.Tensor:
    """Rows (``out``) or columns (``in``) [start, start+size) of a 2-D weight (rows of a 1-D bias)."""
    if axis == "out" or t.dim() == 1:
        return t[start:start + size].contiguous()
    return t[:, start:start + size].contiguous()


def _shard_column(linear: LoRALinear, modules: tuple[str, ...], plan: ShardPlan) -> None:
    """Keeps each packed part's output slice; the fused layout stays part after part."""
    offsets = [sum(linear.out_slices[:i]) for i in range(len(modules))]
    keep = [plan.module_slice(m) for m in modules]
    weight = torch.cat([linear.weight.data[off + start:off + start + size]
                        for off, (_, start, size) in zip(offsets, keep, strict=True)])
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        bias = torch.cat([linear.bias.data[off + start:off + start + size]
                          for off, (_, start, size) in zip(offsets, keep, strict=True)])
        linear.bias = nn.Parameter(bias, requires_grad=False)
    linear.out_slices = tuple(size for _, _, size in keep)


def _all_reduce_output(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
    return comm.all_reduce(output)


def _shard_row(linear: LoRALinear, module: str, plan: ShardPlan) -> None:
    """Keeps the input columns of this rank; the partial outputs are summed over ranks after forward."""
    if linear.bias is not None:  # would be added once per rank
        raise ConfigError(f"{module}: a row-parallel projection with a bias is not supported")
    _, start, size = plan.module_slice(module)
    linear.weight = nn.Parameter(_take(linear.weight.data, "in", start, size), requires_grad=False)
    linear.in_features = size
    linear.register_forward_hook(_all_reduce_output)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding; ids elsewhere give zeros, summed over ranks."""

    def __init__(self, weight: nn.Parameter, start: int):
        super().__init__()
        self.weight = weight
        self.start = start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return comm.all_reduce(out)


class VocabParallelLMHead(nn.Module):
    """Logits of this rank's vocab rows, all-gathered into the full [N, vocab] on every rank."""

    def __init__(self, weight: nn.Parameter, vocab_size: int):
        super().__init__()
        self.weight = weight
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(hidden, self.weight)
        return comm.all_gather_last(logits)[..., :self.vocab_size]


def _vocab_shard(weight: torch.Tensor, plan: ShardPlan) -> nn.Parameter:
    n = plan.vocab_per_rank
    start = plan.rank * n
    part = weight[start:start + n]
    if part.shape[0] < n:  # the last rank: pad to the common shard size (all-gather needs equal parts)
        part = torch.cat([part, part.new_zeros(n - part.shape[0], part.shape[1])])
    return nn.Parameter(part.contiguous(), requires_grad=False)


def shard_model(model: DecoderModel, plan: ShardPlan) -> DecoderModel:
    """Shards ``model`` in place for ``plan.rank`` (call before moving it to its device); returns it."""
    if plan.world_size == 1:
        return model
    for layer in cast("list[DecoderLayer]", model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        _shard_column(attn.qkv_proj, ("q_proj", "k_proj", "v_proj"), plan)
        _shard_row(attn.o_proj, "o_proj", plan)
        attn.attn.num_heads, attn.attn.num_kv_heads = plan.heads, plan.kv_heads
        _shard_column(mlp.gate_up_proj, ("gate_proj", "up_proj"), plan)
        _shard_row(mlp.down_proj, "down_proj", plan)
    spec = plan.spec
    embed = _vocab_shard(model.embed_tokens.weight.data, plan)
    head = embed if spec.tie_word_embeddings else _vocab_shard(model.lm_head.weight.data, plan)
    model.embed_tokens = VocabParallelEmbedding(embed, plan.rank * plan.vocab_per_rank)  # type: ignore[assignment]
    model.lm_head = VocabParallelLMHead(head, spec.vocab_size)  # type: ignore[assignment]
    model.spec = plan.local_spec()
    return model


def shard_lora(w: LoRAWeights, plan: ShardPlan) -> LoRAWeights:
    """This rank's part of an adapter: B's output rows of column-parallel projections, A's input
    columns of row-parallel ones (the other factor whole)."""
    if plan.world_size == 1:
        return w
    weights = {}
    for (layer, module), (a, b) in w.weights.items():
        axis, start, size = plan.module_slice(module)
        if axis == "out":
            weights[(layer, module)] = (a, _take(b, "out", start, size))
        else:
            weights[(layer, module)] = (_take(a, "in", start, size), b)
    return dataclasses.replace(w, weights=weights)
