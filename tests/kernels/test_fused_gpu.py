"""Fused small ops on a GPU at real shapes (Qwen3-0.6B, Llama-3-8B), eagerly and replayed in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from test_fused import (
    DEVICE,
    DTYPES,
    check_early_shrinks,
    check_prologue,
    check_prologue_delta,
    check_rms_norm,
    check_rope,
    close,
    layer_norm,
    rand,
    rope_layer,
)

from loraplex.backend.layers.basic import silu_and_mul as layer_silu_and_mul
from loraplex.kernels.fused import rms_norm, rotary_embedding, silu_and_mul

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]




@pytest.mark.parametrize("dim", [1024, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 256, 4096])
def test_gpu_real_shapes(tokens, dtype, dim):
    check_rms_norm(tokens, dim, dtype)
    x = rand(tokens, 2 * dim * 3, dtype=dtype)
    close(silu_and_mul(x), layer_silu_and_mul(x))
    check_rope(tokens, dim // 128, 8, 128, dtype, exact=dtype == torch.float32)


def test_gpu_cuda_graph_replay():
    """All three ops captured once, replayed on new inputs written in place."""
    tokens, dim, dtype = 64, 1024, torch.bfloat16
    norm, rope = layer_norm(dim, dtype), rope_layer(128)
    x, res = rand(tokens, dim, dtype=dtype), rand(tokens, dim, dtype=dtype, seed=1)
    gate_up = rand(tokens, 2 * 3072, dtype=dtype)
    q, k = rand(tokens, 16, 128, dtype=dtype), rand(tokens, 8, 128, dtype=dtype)
    positions = torch.arange(tokens, device=DEVICE)
    run = lambda: (rms_norm(x, norm.weight, norm.eps, res), silu_and_mul(gate_up),  # noqa: E731
                   rotary_embedding(positions, q, k, rope.cos, rope.sin))
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (y, r), act, _ = run()
    for _ in range(2):
        for t in (x, res, gate_up, q, k):
            t.copy_(torch.randn_like(t))
        positions.copy_(torch.randint(0, 4096, (tokens,), device=DEVICE))
        q0, k0 = q.clone(), k.clone()
        graph.replay()
        with torch.no_grad():
            close(y, norm(x + res))
        close(r, x + res)
        close(act, layer_silu_and_mul(gate_up))
        wq, wk = rope(positions, q0, k0)
        close(q, wq)
        close(k, wk)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "qk_norm"), [(16, 8, True), (32, 8, False)])
@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_qk_norm_rope_write_kv_real_shapes(tokens, heads, kv_heads, qk_norm, dtype):
    check_prologue(tokens, heads, kv_heads, 128, 16, dtype, qk_norm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dim", "inter", "heads"), [(1024, 3072, 16), (4096, 14336, 32)])
@pytest.mark.parametrize("tokens", [2, 32, 256])
def test_lora_inside_the_fused_ops_real_shapes(tokens, dim, inter, heads, dtype):
    """Qwen3-0.6B and Llama-3-8B shapes: the norms' and SiLU's early shrinks (qkv's 3 x 16 columns) and
    the prologue's q/k/v expand, as the decode steps run them."""
    check_early_shrinks(tokens, dim, inter, 48, dtype)
    check_prologue_delta(tokens, heads, 8, 128, dtype, heads == 16, 1)
