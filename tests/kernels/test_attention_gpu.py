"""Triton paged attention on a GPU at real shapes (Qwen3-0.6B, Llama-3-8B heads), contexts up to 32k,
eagerly and replayed in a captured CUDA graph whose inputs change in place. Two sweeps over the
kernel's compile-time shapes (head dims x GQA ratios, block sizes) rather than their cross product."""

from __future__ import annotations

import pytest
import torch
from attention_cases import check, make_step
from test_attention_triton import run_triton

from loraplex.kernels.attention import paged_attention, write_kv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HEADS = {"qwen3-0.6b": (16, 8, 128), "llama3-8b": (32, 8, 128)}
LONG = [1, 17, 1000, 4097, 8000, 16384, 32768, 555]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model", list(HEADS))
def test_decode_long_contexts(model, dtype):
    heads, kv_heads, head_dim = HEADS[model]
    step = make_step(LONG, [1] * len(LONG), heads, kv_heads, head_dim, 16, dtype, device="cuda")
    check(run_triton(step), step.reference(), dtype)


@pytest.mark.parametrize("window", [None, 4096])
@pytest.mark.parametrize("model", list(HEADS))
def test_prefill_chunked_and_mixed(model, window):
    """A fresh prompt, a chunk over a 3k cached prefix, and decodes in one step."""
    heads, kv_heads, head_dim = HEADS[model]
    seq_lens, query_lens = [1500, 5000, 9000, 300, 77], [1500, 2000, 1, 1, 77]
    step = make_step(seq_lens, query_lens, heads, kv_heads, head_dim, 16, torch.bfloat16, window=window,
                     device="cuda")
    check(run_triton(step), step.reference(), torch.bfloat16)


GROUPS = [(8, 8), (8, 4), (8, 2), (8, 1), (32, 4), (16, 1)]  # GQA 1, 2, 4, 8, MQA


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize(("heads", "kv_heads"), GROUPS)
@pytest.mark.parametrize("query_len", [1, 64])
def test_heads_sweep(heads, kv_heads, head_dim, dtype, query_len):
    seq_lens = [700, 64, 2100, 129]
    step = make_step(seq_lens, [min(query_len, n) for n in seq_lens], heads, kv_heads, head_dim, 16, dtype,
                     device="cuda", seed=head_dim)
    check(run_triton(step), step.reference(), dtype)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("query_len", [1, 50])
@pytest.mark.parametrize("window", [None, 300])
def test_block_sizes(block_size, query_len, window):
    seq_lens = [1000, 3, 2500, 400]
    step = make_step(seq_lens, [min(query_len, n) for n in seq_lens], 16, 8, 128, block_size, torch.bfloat16,
                     window=window, device="cuda", seed=block_size)
    check(run_triton(step), step.reference(), torch.bfloat16)


def _refill(step, seq_lens: list[int], gen: torch.Generator) -> None:
    """New contexts (within the captured table width) and new values, written in place."""
    num_blocks, block_size = step.k_cache.shape[:2]
    for t in (step.q, step.k_cache, step.v_cache):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    step.block_tables.copy_(torch.randint(0, num_blocks, step.block_tables.shape, generator=gen))
    step.seq_lens.copy_(torch.tensor(seq_lens))


@pytest.mark.parametrize("model", list(HEADS))
def test_decode_in_cuda_graph(model):
    heads, kv_heads, head_dim = HEADS[model]
    batch = 32
    step = make_step([4096] * batch, [1] * batch, heads, kv_heads, head_dim, 16, torch.bfloat16, device="cuda")
    qsl = step.query_start_loc
    run = lambda: paged_attention(step.q, step.k_cache, step.v_cache, step.block_tables, step.seq_lens,  # noqa: E731
                                  step.query_lens, step.query_index, 1, step.scale, query_start_loc=qsl)
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        _refill(step, torch.randint(1, 4097, (batch,), generator=gen).tolist(), gen)
        out.fill_(float("nan"))
        graph.replay()
        check(out, step.reference(), torch.bfloat16)


@pytest.mark.parametrize("first", [600, 6000])  # 6000: decode rows take the split launch
def test_mixed_step_in_cuda_graph(first):
    """A prefill launch sized by max_query_len at capture stays right for any step within it."""
    step = make_step([first, 300, 40, 1], [64, 64, 40, 1], 16, 8, 128, 16, torch.bfloat16, device="cuda")
    qsl = step.query_start_loc.clone()
    graph = torch.cuda.CUDAGraph()
    run_triton(step, qsl=qsl)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = run_triton(step, qsl=qsl)
    gen = torch.Generator().manual_seed(8)
    query_lens = [64, 40, 64, 1]  # the same 169 rows split differently, none longer than 64
    _refill(step, [first, 40, 70, 2], gen)
    step.query_lens.copy_(torch.tensor(query_lens))
    step.query_index = torch.cat([torch.arange(n) + b * 64 for b, n in enumerate(query_lens)]).cuda()
    qsl.copy_(step.query_start_loc)
    out.fill_(float("nan"))
    graph.replay()
    check(out, step.reference(), torch.bfloat16)


def test_write_kv_real_shapes():
    num_blocks, block_size, kv_heads, head_dim = 4096, 16, 8, 128
    kv = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 4096, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:4096]
    slots[::7] = -1
    expected = kv.clone()
    write_kv(k, v, expected[1, 0], expected[1, 1], slots, backend="torch")
    write_kv(k, v, kv[1, 0], kv[1, 1], slots)
    assert torch.equal(kv, expected)


@pytest.mark.parametrize("window", [None, 4096])
def test_no_new_kernel_variant_after_warm_up(window):
    """After ``warm_up`` for a layer configuration, steps of any shape compile nothing: decode of
    any batch and context, prefill chunks of any length, mixed steps over short and long tables.
    (A compile in the middle of serving costs 0.1-1 s: the nano-vllm workload's mixed steps paid one
    in most steps when the query-tile and split counts were compile-time constants.)"""
    from loraplex.kernels import attention_triton
    from loraplex.kernels.attention import warm_up

    heads, kv_heads, head_dim = HEADS["qwen3-0.6b"]
    cache = make_step([16], [1], heads, kv_heads, head_dim, 16, torch.bfloat16, device="cuda")
    warm_up(heads, cache.k_cache, cache.v_cache, head_dim**-0.5, window)
    before = attention_triton.compiled_variants()
    assert before > 0
    gen = torch.Generator().manual_seed(0)
    for num_seqs in (1, 2, 7, 16, 33, 100, 256):
        for long in (False, True):
            seq_lens = torch.randint(1, 5000 if long else 1000, (num_seqs,), generator=gen).tolist()
            decode = make_step(seq_lens, [1] * num_seqs, heads, kv_heads, head_dim, 16, torch.bfloat16,
                               window=window, device="cuda")
            run_triton(decode)
            query_lens = [max(1, min(s, int(q))) for s, q in
                          zip(seq_lens, torch.randint(1, 700, (num_seqs,), generator=gen).tolist(), strict=True)]
            query_lens[0] = 1  # a decode row beside the chunks
            mixed = make_step(seq_lens, query_lens, heads, kv_heads, head_dim, 16, torch.bfloat16, window=window,
                              device="cuda")
            check(run_triton(mixed), mixed.reference(), torch.bfloat16)
    assert attention_triton.compiled_variants() == before
