"""Triton LoRA kernels on a GPU at real layer shapes (Llama-3-8B, Qwen3-0.6B), bf16: eagerly, on one
long single-adapter segment (4096 and 16k tokens), replayed in captured CUDA graphs whose inputs,
weights and token -> slot map change in place (SGMV tiles rebuilt on the device each replay), and
without compiling a new kernel variant for any batch after warm-up; the same for the fused
shrink+expand (add_lora(fused=True))."""

from __future__ import annotations

import pytest
import torch
from test_lora_fused import check_fused, run_fused
from test_lora_kernels import (
    DISTRIBUTIONS,
    Case,
    LoRABatchMeta,
    LoRAPlan,
    add_lora,
    check_against_reference,
    lora,
    lora_torch,
    lora_triton,
    make_case,
    naive_add_lora,
    request_slots,
    run_ops,
    token_slots,
)

PARTIALS = [0, lora.PARTIALS]  # [T, N] buffer (no split-K); [P, T, N] partial sums

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
    """S = len(ranks) slots when ranks are given, else enough rank-16 slots for ``slots``."""
    h_in, outs = layer_dims(shape, layer)
    ranks = ranks or [16] * max(NUM_SLOTS, max(slots) + 1)
    return make_case(slots, len(ranks), ranks, h_in, outs, torch.bfloat16, "cuda", seed)


def planned_block_m(case: Case) -> int:
    return case.meta.plan_for(case.lora_b.shape[2]).block_m


@pytest.mark.parametrize("partials", PARTIALS)
@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_ops_real_shapes(shape: str, layer: str, kind: str, partials: int):
    case = real_case(shape, layer, batch_slots(kind, seed=1), seed=1)
    check_against_reference(case, kind, *run_ops(case, kind, lora_triton, partials, planned_block_m(case)))


@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_ops_by_distribution_llama_qkv(dist: str, kind: str):
    case = real_case("llama3-8b", "qkv", batch_slots(kind, seed=2, dist=dist), seed=2)
    check_against_reference(case, kind, *run_ops(case, kind, lora_triton, block_m=planned_block_m(case)))


@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("rank", [8, 64, 0], ids=["8", "64", "mixed"])
def test_ops_by_rank_qwen_gate_up(rank: int, kind: str):
    ranks = [rank] * NUM_SLOTS if rank else [(8, 16, 32, 64)[i % 4] for i in range(NUM_SLOTS)]
    case = real_case("qwen3-0.6b", "gate_up", batch_slots(kind, seed=3, dist="uniform"), seed=3, ranks=ranks)
    check_against_reference(case, kind, *run_ops(case, kind, lora_triton, block_m=64))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape,tokens", [("qwen3-0.6b", 4096), ("llama3-8b", 4096), ("qwen3-0.6b", 16384),
                                          ("llama3-8b", 16384)])
def test_one_long_segment(shape: str, tokens: int, layer: str):
    """One adapter for the whole batch (32 x 128 prefill = 4096 tokens; a 16k prompt): add_lora's own
    plan and buffer, against the reference."""
    case = real_case(shape, layer, [5] * tokens, seed=tokens)
    plan = case.meta.plan_for(16)
    assert plan.kind == "sgmv" and case.meta.tiles(plan.block_m, NUM_SLOTS).num_tiles == tokens // plan.block_m
    check_against_reference(case, "sgmv", *run_ops(case, "sgmv", lora_triton, lora.default_partials(tokens),
                                                   plan.block_m))
    y = case.fresh_y()
    add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.out_slices, case.meta)
    _, ref_y = run_ops(case, "sgmv", lora_torch)
    torch.testing.assert_close(y.float(), ref_y.float(), atol=1.6e-2, rtol=1.6e-2)


def new_slots(tokens: int, seed: int) -> list[int]:
    """Any spread at all: the graph's tile table is rebuilt on the device at each replay."""
    gen = torch.Generator().manual_seed(seed)
    dist = ("identical", "distinct", "with_base", "zipf")[seed % 4]
    num = min(tokens, 64) if dist == "distinct" else NUM_SLOTS
    reqs = min(tokens, num) if dist == "distinct" else max(1, tokens // 8)
    lengths = torch.randint(1, 2 * tokens // reqs + 1, (reqs,), generator=gen).tolist()
    return (token_slots(request_slots(dist, reqs, num, gen), lengths) + [-1] * tokens)[:tokens]


@pytest.mark.parametrize("plan", [LoRAPlan("bgmv", 16), LoRAPlan("sgmv", 16), LoRAPlan("sgmv", 64)], ids=str)
@pytest.mark.parametrize("tokens", [64, 512])
@pytest.mark.parametrize("layer", ["qkv", "down"])
def test_add_lora_replayed_in_cuda_graph(layer: str, tokens: int, plan: LoRAPlan):
    """Captured once over a persistent slot buffer (as the decode graphs hold it); each replay gets
    new inputs, adapter weights and an arbitrary token -> slot map."""
    replay_add_lora(layer, tokens, plan, fused=False)


def replay_add_lora(layer: str, tokens: int, plan: LoRAPlan, fused: bool) -> None:
    static = real_case("llama3-8b", layer, new_slots(tokens, 0), seed=4, ranks=[16] * 64)
    meta = LoRABatchMeta.on_device(static.meta.token_slots.clone(), plan)
    buf = lora.lora_buffer(tokens, static.lora_a)
    y = static.fresh_y()
    args = (static.x, static.lora_a, static.lora_b, static.scales, static.out_slices)
    add_lora(y, *args, LoRABatchMeta.on_device(meta.token_slots, plan), buf=buf, fused=fused)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        add_lora(y, *args, meta, buf=buf, fused=fused)
    for seed in (5, 6, 7, 8):
        new = real_case("llama3-8b", layer, new_slots(tokens, seed), seed=seed, ranks=[16] * 64)
        static.x.copy_(new.x)
        y.copy_(new.y)
        for dst, src in ((static.lora_a, new.lora_a), (static.lora_b, new.lora_b), (static.scales, new.scales)):
            dst.copy_(src)
        meta.token_slots.copy_(new.meta.token_slots)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.float(), naive_add_lora(new), atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_no_new_kernel_variant_after_warmup(shape: str):
    """After lora.warmup for a layer, batches of any size and spread compile nothing (Triton would
    specialise batch-dependent ints equal to 1 or divisible by 16)."""
    assert_no_compile_after_warmup(shape, fused=False)


def assert_no_compile_after_warmup(shape: str, fused: bool) -> None:
    h_in, outs = layer_dims(shape, "qkv")
    case = make_case([0], 64, [16] * 64, h_in, outs, torch.bfloat16, "cuda")  # new_slots uses up to 64
    lora.warmup(case.lora_a, case.lora_b, case.scales, outs)
    before = lora_triton.compiled_variants()
    assert before > 0
    for tokens in (1, 2, 7, 16, 32, 33, 100, 256, 512, 1000, 4096, 5000):
        for seed in range(4):
            slots = new_slots(tokens, seed)
            x = torch.randn(tokens, h_in, device="cuda", dtype=torch.bfloat16)
            y = torch.zeros(tokens, sum(outs), device="cuda", dtype=torch.bfloat16)
            for meta in (LoRABatchMeta.build(slots, "cuda"),
                         LoRABatchMeta.on_device(torch.tensor(slots, dtype=torch.int32, device="cuda"),
                                                 LoRAPlan("sgmv", 16))):
                add_lora(y, x, case.lora_a, case.lora_b, case.scales, outs, meta, fused=fused)
    assert lora_triton.compiled_variants() == before


@pytest.mark.parametrize("mode", ["serial", "overlap", "fused"])
@pytest.mark.parametrize("plan", [None, LoRAPlan("sgmv", 16)], ids=["bgmv", "sgmv"])
def test_lora_linear_replayed_in_cuda_graph(plan: LoRAPlan | None, mode: str):
    """The model's layer as the decode graphs capture it in each LoRALinear.mode (overlap: the shrink on a
    side stream beside the base GEMM; fused: one kernel): base GEMM + LoRA against F.linear + the torch path."""
    from loraplex.backend.layers.context import ForwardContext, forward_context
    from loraplex.backend.layers.lora import LoRALinear

    h_in, outs = layer_dims("qwen3-0.6b", "qkv")
    static = real_case("qwen3-0.6b", "qkv", new_slots(64, 0), seed=9, ranks=[16] * 64)
    layer = LoRALinear(h_in, tuple(outs), dtype=torch.bfloat16).cuda()
    layer.weight.data.normal_(std=h_in**-0.5)
    layer.set_lora(static.lora_a, static.lora_b, static.scales)
    x, slots = static.x.contiguous(), static.meta.token_slots.clone()
    graph = torch.cuda.CUDAGraph()
    default = LoRALinear.mode
    LoRALinear.mode = mode  # type: ignore[assignment]
    try:
        with torch.inference_mode():
            with forward_context(ForwardContext(None, LoRABatchMeta.on_device(slots, plan))):  # type: ignore[arg-type]
                layer(x)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph), forward_context(ForwardContext(None, LoRABatchMeta.on_device(slots, plan))):  # type: ignore[arg-type]
                out = layer(x)
    finally:
        LoRALinear.mode = default
    for seed in (10, 11, 12):
        new = real_case("qwen3-0.6b", "qkv", new_slots(64, seed), seed=seed, ranks=[16] * 64)
        x.copy_(new.x)
        slots.copy_(new.meta.token_slots)
        for dst, src in ((static.lora_a, new.lora_a), (static.lora_b, new.lora_b), (static.scales, new.scales)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.nn.functional.linear(x, layer.weight)
        add_lora(expected, x, new.lora_a, new.lora_b, new.scales, outs, new.meta, backend="torch")
        torch.testing.assert_close(out.float(), expected.float(), atol=1.6e-2, rtol=1.6e-2)


# ---- fused shrink+expand: one launch per LoRA linear

@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_real_shapes(shape: str, layer: str, kind: str):
    case = real_case(shape, layer, batch_slots(kind, seed=1), seed=1)
    block_m = planned_block_m(case)
    check_fused(case, run_fused(case, kind, lora_triton, block_m), run_fused(case, kind, lora_torch, block_m))


@pytest.mark.parametrize("kind", ["sgmv", "bgmv"])
@pytest.mark.parametrize("rank", [8, 64, 0], ids=["8", "64", "mixed"])
def test_fused_by_rank_qwen_qkv(rank: int, kind: str):
    ranks = [rank] * NUM_SLOTS if rank else [(8, 16, 32, 64)[i % 4] for i in range(NUM_SLOTS)]
    case = real_case("qwen3-0.6b", "qkv", batch_slots(kind, seed=3, dist="uniform"), seed=3, ranks=ranks)
    check_fused(case, run_fused(case, kind, lora_triton, 64), run_fused(case, kind, lora_torch, 64))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_one_long_segment(shape: str, layer: str):
    """4096 tokens of one adapter through add_lora(fused=True) and its own plan."""
    case = real_case(shape, layer, [5] * 4096, seed=4096)
    y = case.fresh_y()
    add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.out_slices, case.meta, fused=True)
    check_fused(case, y, run_fused(case, "sgmv", lora_torch, 64))


@pytest.mark.parametrize("plan", [LoRAPlan("bgmv", 16), LoRAPlan("sgmv", 16), LoRAPlan("sgmv", 64)], ids=str)
@pytest.mark.parametrize("tokens", [64, 512])
@pytest.mark.parametrize("layer", ["qkv", "down"])
def test_fused_add_lora_replayed_in_cuda_graph(layer: str, tokens: int, plan: LoRAPlan):
    replay_add_lora(layer, tokens, plan, fused=True)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_no_new_fused_variant_after_warmup(shape: str):
    assert_no_compile_after_warmup(shape, fused=True)
