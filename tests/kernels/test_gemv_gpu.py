"""Skinny GEMM on a GPU at the real shapes of Qwen3-0.6B and Llama-3-8B: every mode against the
float32 twin and cuBLAS, eagerly and replayed in a CUDA graph; auto dispatch; no recompiles within
a row bucket."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from test_gemv import CONFIGS, DEVICE, check, close, operands

from loraplex.kernels import gemv_triton
from loraplex.kernels.gemv import (
    GemvConfig,
    _entry,
    auto_config,
    m_bucket,
    skinny_linear,
    skinny_linear_torch,
    warm_up,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QWEN = {"qkv": (4096, 1024), "o_proj": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
        "lm_head": (151936, 1024)}
LLAMA = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
         "lm_head": (128256, 4096)}
REAL_CONFIGS = {  # the kinds the sweep picks, at real tile sizes
    "fma-m1": GemvConfig(1, 8, 512),
    "fma-m1-split4": GemvConfig(1, 16, 256, split_k=4, num_warps=8),
    "fma-m4-split2-atomic": GemvConfig(4, 4, 256, split_k=2, reduce="atomic"),
    "dot-split2": GemvConfig(16, 32, 128, split_k=2, mode="dot", num_stages=3),
    "dot-swap": GemvConfig(32, 64, 128, mode="dot_swap", num_stages=3),
}


@functools.cache
def weight(n: int, k: int) -> torch.Tensor:
    """A bf16 [n, k] weight made on the GPU (the 1 GB LM head of Llama-3-8B is slow to draw on the CPU)."""
    gen = torch.Generator(device=DEVICE).manual_seed(n + k)
    return (torch.randn(n, k, device=DEVICE, generator=gen) * k ** -0.5).bfloat16()


@pytest.mark.parametrize("shape", [*(f"qwen/{p}" for p in QWEN), *(f"llama/{p}" for p in LLAMA)])
def test_real_shapes_table_or_default_config(shape):
    model, proj = shape.split("/")
    n, k = (QWEN if model == "qwen" else LLAMA)[proj]
    w = weight(n, k)
    for m in (1, 3, 8, 16, 32):
        x = torch.randn(m, k, device=DEVICE).bfloat16()
        got = skinny_linear(x, w, backend="triton")
        close(got, skinny_linear_torch(x, w))
        close(got, F.linear(x, w))
    weight.cache_clear()


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_mode_at_qwen_shapes(name, dtype):
    cfg = REAL_CONFIGS[name]
    for proj in ("qkv", "down"):
        n, k = QWEN[proj]
        for m in sorted({1, cfg.block_m if cfg.block_m <= 4 else 7}):
            check(m, n, k, dtype, cfg, bias=proj == "qkv")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_small_configs_on_the_gpu(name):
    check(3, 37, 100, torch.bfloat16, CONFIGS[name], bias=True)


def test_cuda_graph_replay_on_new_inputs():
    """qkv (split partials), down (split atomic) and the LM head into a slice of a logits buffer,
    captured once, replayed on inputs rewritten in place."""
    m = 4
    ops = [("qkv", REAL_CONFIGS["fma-m1-split4"]), ("down", REAL_CONFIGS["fma-m4-split2-atomic"]),
           ("lm_head", GemvConfig(4, 4, 256))]
    tensors = [operands(m, *QWEN[p], torch.bfloat16, bias=p == "qkv") for p, _ in ops]
    logits = torch.empty(8, QWEN["lm_head"][0], dtype=torch.bfloat16, device=DEVICE)

    def run() -> list[torch.Tensor]:
        outs = [skinny_linear(x, w, b, backend="triton", config=cfg)
                for (x, w, b), (_, cfg) in zip(tensors[:2], ops[:2], strict=True)]
        x, w, _ = tensors[2]
        outs.append(skinny_linear(x, w, out=logits[:m], backend="triton", config=ops[2][1]))
        return outs

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for _ in range(2):
        for x, _, _ in tensors:
            x.copy_(torch.randn_like(x))
        graph.replay()
        for out, (x, w, b) in zip(outs, tensors, strict=True):
            close(out, skinny_linear_torch(x, w, b))


def test_auto_dispatch_follows_the_table():
    """auto = the kernel exactly where the table says so for eager launches, cuBLAS (bit for bit
    F.linear) elsewhere; inside a capture, the entry's in-graph verdict."""
    for n, k in QWEN.values():
        w = weight(n, k)
        for m in (1, 2, 5, 32, 33):
            x = torch.randn(m, k, device=DEVICE).bfloat16()
            cfg, entry = auto_config(x, w), _entry(x, w)
            assert cfg == (entry.config if entry is not None and entry.eager else None)
            got = skinny_linear(x, w)
            if cfg is None:
                assert torch.equal(got, F.linear(x, w))
            else:
                assert m <= 32  # the kernel (split-K by atomics is not bitwise repeatable: compare by tolerance)
                close(got, skinny_linear(x, w, backend="triton", config=cfg))
            if entry is not None and entry.in_graphs:
                warm_up([w])
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured_cfg = auto_config(x, w)
                    out = skinny_linear(x, w)
                graph.replay()
                assert captured_cfg == entry.config
                close(out, skinny_linear_torch(x, w))


def _compiled() -> int | None:
    caches = getattr(gemv_triton._gemv_kernel, "device_caches", None)
    if caches is None:
        return None
    return sum(len(entry[0]) for entry in caches.values())


def test_no_recompile_within_a_row_bucket():
    cfg = GemvConfig(8, 4, 256, split_k=2)
    n, k = QWEN["down"]
    check(5, n, k, torch.bfloat16, cfg)
    before = _compiled()
    if before is None:
        pytest.skip("this Triton keeps its kernel cache elsewhere")
    for m in range(1, 9):
        assert m_bucket(m) <= cfg.block_m
        check(m, n, k, torch.bfloat16, cfg)
    assert _compiled() == before


def test_warm_up_then_capture():
    """warm_up compiles what auto dispatch will launch, so a capture in global mode meets no compile."""
    weights = [weight(n, k) for n, k in QWEN.values()]
    warm_up(weights)
    pairs = [(torch.randn(m, w.shape[1], device=DEVICE).bfloat16(), w) for w in weights for m in (1, 4)]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="global"):
        outs = [skinny_linear(x, w) for x, w in pairs]
    graph.replay()
    for out, (x, w) in zip(outs, pairs, strict=True):
        close(out, skinny_linear_torch(x, w))
