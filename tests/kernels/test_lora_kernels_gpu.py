"""Triton LoRA kernels on a GPU at real layer shapes (Llama-3-8B, Qwen3-0.6B), bf16, eagerly and
replayed in a captured CUDA graph whose inputs, weights and slot assignment change in place."""

from __future__ import annotations

import pytest
import torch
from test_lora_kernels import (
    DISTRIBUTIONS,
    Case,
    LoRABatchMeta,
    add_lora,
    check_against_reference,
    lora,
    lora_triton,
    make_case,
    request_slots,
    run_ops,
    token_slots,
)

PARTIALS = [0, lora.PARTIALS]  # [T, N] buffer with atomic split-K; [P, T, N] partial sums

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = {  # hidden, intermediate, q, kv
    "llama3-8b": (4096, 14336, 4096, 1024),
    "qwen3-0.6b": (1024, 3072, 2048, 1024),
}
LAYERS = ["qkv", "o", "gate_up", "down"]
NUM_SLOTS = 16


def layer_dims(shape: str, layer: str) -> tuple[int, list[int]]:
    """(H_in, out_slices) of one LoRA-wrapped linear of a decoder layer."""
    hidden, inter, q, kv = SHAPES[shape]
    return {
        "qkv": (hidden, [q, kv, kv]),
        "o": (q, [hidden]),
        "gate_up": (hidden, [inter, inter]),
        "down": (inter, [hidden]),
    }[layer]


def batch_slots(kind: str, seed: int, dist: str = "with_base") -> list[int]:
    """bgmv: a decode batch of 64 one-token requests; sgmv: 256 prefill tokens in runs of 1..64."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "bgmv":
        return request_slots(dist, 64, 64 if dist == "distinct" else NUM_SLOTS, gen)
    lengths = torch.randint(1, 65, (16,), generator=gen).tolist()
    slots = token_slots(request_slots(dist, 16, NUM_SLOTS, gen), lengths)
    return (slots + [-1] * 256)[:256]


def real_case(shape: str, layer: str, slots: list[int], seed: int, ranks: list[int] | None = None) -> Case:
    h_in, outs = layer_dims(shape, layer)
    num_slots = max(NUM_SLOTS, max(slots) + 1)
    return make_case(slots, num_slots, ranks or [16] * num_slots, h_in, outs, torch.bfloat16, "cuda", seed)


@pytest.mark.parametrize("partials", PARTIALS)
@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_ops_real_shapes(shape: str, layer: str, kind: str, partials: int):
    case = real_case(shape, layer, batch_slots(kind, seed=1), seed=1)
    check_against_reference(case, kind, *run_ops(case, kind, lora_triton, partials))


@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_ops_by_distribution_llama_qkv(dist: str, kind: str):
    case = real_case("llama3-8b", "qkv", batch_slots(kind, seed=2, dist=dist), seed=2)
    check_against_reference(case, kind, *run_ops(case, kind, lora_triton))


@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("rank", [8, 64, 0], ids=["8", "64", "mixed"])
def test_ops_by_rank_qwen_gate_up(rank: int, kind: str):
    ranks = [rank] * NUM_SLOTS if rank else [(8, 16, 32, 64)[i % 4] for i in range(NUM_SLOTS)]
    case = real_case("qwen3-0.6b", "gate_up", batch_slots(kind, seed=3, dist="uniform"), seed=3, ranks=ranks)
    check_against_reference(case, kind, *run_ops(case, kind, lora_triton))


def _same_segments_new_slots(meta: LoRABatchMeta, seed: int) -> tuple[list[int], list[int]]:
    """New (token_slots, seg_slots) keeping meta's segment boundaries (adjacent segments may share a slot)."""
    gen = torch.Generator().manual_seed(seed)
    seg_slots = torch.randint(-1, NUM_SLOTS, (meta.num_segs,), generator=gen)
    lens = (meta.seg_starts[1:] - meta.seg_starts[:-1]).cpu()
    return torch.repeat_interleave(seg_slots, lens).tolist(), seg_slots.tolist()


def _load_into(static: Case, new: Case, meta: LoRABatchMeta, seg_slots: list[int], y: torch.Tensor) -> None:
    """In place, as a runner does between replays: inputs, adapter weights and slot assignment."""
    static.x.copy_(new.x)
    y.copy_(new.y)
    for dst, src in ((static.lora_a, new.lora_a), (static.lora_b, new.lora_b), (static.scales, new.scales)):
        dst.copy_(src)
    meta.token_slots.copy_(new.meta.token_slots)
    meta.seg_slots.copy_(torch.tensor(seg_slots, dtype=torch.int32))


@pytest.mark.parametrize("partials", PARTIALS)
@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_add_lora_replayed_in_cuda_graph(shape: str, layer: str, kind: str, partials: int):
    static = real_case(shape, layer, batch_slots(kind, seed=4), seed=4)
    meta = static.meta
    buf = lora.lora_buffer(static.x.shape[0], static.lora_a, partials)
    y = static.fresh_y()
    args = (static.x, static.lora_a, static.lora_b, static.scales, static.out_slices, meta)
    add_lora(y, *args, buf=buf, kind=kind)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        add_lora(y, *args, buf=buf, kind=kind)
    for seed in (5, 6):
        new_tokens, seg_slots = _same_segments_new_slots(meta, seed)
        new = real_case(shape, layer, new_tokens, seed=seed)
        _load_into(static, new, meta, seg_slots, y)
        graph.replay()
        torch.cuda.synchronize()
        check_against_reference(new, kind, buf, y)
