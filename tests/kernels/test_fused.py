"""Fused small ops (RMSNorm + residual, SiLU-and-mul, RoPE): Triton against the torch twins and the
model's own layers (backend/layers/basic.py), float32 and bf16. test_fused_gpu.py reuses the helpers
at real shapes."""

from __future__ import annotations

import pytest
import torch

from loraplex.backend.layers.basic import RMSNorm, RotaryEmbedding
from loraplex.backend.layers.basic import silu_and_mul as layer_silu_and_mul
from loraplex.kernels.fused import qk_norm_rope_write_kv, rms_norm, rotary_embedding, silu_and_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32: reduction order only. bf16: one rounding apart at most (the interpreter truncates bf16).
TOLS = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    atol, rtol = TOLS[torch.bfloat16 if torch.bfloat16 in (a.dtype, b.dtype) else torch.float32]
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def rand(*shape: int, dtype: torch.dtype, seed: int = 0, device: str = DEVICE) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def layer_norm(dim: int, dtype: torch.dtype, device: str = DEVICE) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(rand(dim, dtype=dtype, seed=9, device=device) * 0.5 + 1)
    return norm


def rope_layer(head_dim: int, max_pos: int = 4096, device: str = DEVICE) -> RotaryEmbedding:
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return RotaryEmbedding(head_dim, max_pos, inv_freq).to(device)


def check_rms_norm(tokens: int, dim: int, dtype: torch.dtype, backend: str = "triton") -> None:
    norm = layer_norm(dim, dtype)
    x, res = rand(tokens, dim, dtype=dtype, seed=1), rand(tokens, dim, dtype=dtype, seed=2)
    with torch.no_grad():
        close(rms_norm(x, norm.weight, norm.eps, backend=backend), norm(x))
        y, r = rms_norm(x, norm.weight, norm.eps, res, backend=backend)
        close(r, x + res)
        close(y, norm(x + res))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "dim"), [(3, 64), (5, 96), (1, 1000)])
def test_rms_norm_matches_layer(tokens, dim, dtype):
    check_rms_norm(tokens, dim, dtype)
    check_rms_norm(tokens, dim, dtype, backend="torch")


def test_rms_norm_per_head_3d():
    """Qwen3's q/k norm: [T, H, D] normalised over D."""
    x = rand(4, 3, 64, dtype=torch.float32)
    w = rand(64, dtype=torch.float32, seed=5)
    close(rms_norm(x, w, 1e-6, backend="triton"), rms_norm(x, w, 1e-6, backend="torch"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "inter"), [(3, 40), (2, 1500)])
def test_silu_and_mul_matches_layer(tokens, inter, dtype):
    x = rand(tokens, 2 * inter, dtype=dtype)
    out = silu_and_mul(x, backend="triton")
    assert out.shape == (tokens, inter)
    close(out, layer_silu_and_mul(x))
    close(silu_and_mul(x, backend="torch"), layer_silu_and_mul(x))


def check_rope(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, exact: bool) -> None:
    rope = rope_layer(head_dim)
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=3)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)  # strided views of the fused projection
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want_q, want_k = rope(positions, q.clone(), k.clone())
    rotary_embedding(positions, q, k, rope.cos, rope.sin, backend="triton")
    if exact:
        assert torch.equal(q, want_q) and torch.equal(k, want_k)
    close(q, want_q)
    close(k, want_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 64), (3, 1, 80), (2, 2, 128)])
def test_rope_matches_layer(heads, kv_heads, head_dim, dtype):
    check_rope(5, heads, kv_heads, head_dim, dtype, exact=dtype == torch.float32)


def test_rope_torch_twin_matches_layer():
    rope = rope_layer(64)
    q, k = rand(3, 4, 64, dtype=torch.bfloat16), rand(3, 2, 64, dtype=torch.bfloat16, seed=1)
    positions = torch.tensor([0, 7, 4095], device=DEVICE)
    want = rope(positions, q.clone(), k.clone())
    got = rotary_embedding(positions, q.clone(), k.clone(), rope.cos, rope.sin, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def check_prologue(tokens: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                   qk_norm: bool, device: str = DEVICE) -> None:
    rope = rope_layer(head_dim, device=device)
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=6, device=device)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(7)).to(device)
    num_blocks = -(-tokens // block_size) + 2
    cache = rand(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, seed=8, device=device)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(9))[:tokens]
    slots[1::3] = -1  # padding rows: no write
    slots = slots.to(device)
    weights = (rand(head_dim, dtype=dtype, seed=10, device=device), rand(head_dim, dtype=dtype, seed=11,
                                                                         device=device)) if qk_norm else (None, None)
    want_cache = cache.clone()
    want_q = qk_norm_rope_write_kv(qkv, positions, rope.cos, rope.sin, want_cache[0], want_cache[1], slots, heads,
                                   kv_heads, *weights, eps=1e-6, backend="torch")
    q = qk_norm_rope_write_kv(qkv, positions, rope.cos, rope.sin, cache[0], cache[1], slots, heads, kv_heads,
                              *weights, eps=1e-6, backend="triton")
    assert q.shape == (tokens, heads, head_dim)
    close(q, want_q)
    close(cache, want_cache)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0].cpu()] = False
    assert torch.equal(cache[:, untouched.view(num_blocks, block_size)],
                       want_cache[:, untouched.view(num_blocks, block_size)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), [(4, 2, 64, 4), (3, 1, 80, 1)])
def test_qk_norm_rope_write_kv(heads, kv_heads, head_dim, block_size, dtype, qk_norm):
    check_prologue(7, heads, kv_heads, head_dim, block_size, dtype, qk_norm)


def make_delta(tokens: int, out_slices: tuple[int, ...], dtype: torch.dtype, partials: int = 1, rank: int = 8):
    """A pending BGMV expand over 3 slots (rank < the stack's 16 columns, zero-padded as the slots are),
    token 1 on no adapter."""
    from loraplex.kernels.lora import LoRADelta

    n, r_max = len(out_slices), 16
    h = rand(partials, tokens, n * r_max, dtype=torch.float32, seed=11) * 0.25
    b = torch.zeros(3, sum(out_slices), r_max, dtype=dtype, device=DEVICE)
    b[:, :, :rank] = rand(3, sum(out_slices), rank, dtype=dtype, seed=12)
    slots = torch.tensor([(2 * t) % 3 if t != 1 else -1 for t in range(tokens)], dtype=torch.int32, device=DEVICE)
    scales = torch.tensor([0.5, 2.0, 1.25], device=DEVICE)
    return LoRADelta(h if partials > 1 else h[0], b, scales, out_slices, slots)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("partials", [1, 3, 14])  # 14: SiLU's early shrink of Llama-3-8B's MLP
def test_norm_and_silu_apply_a_pending_lora_expand(dtype, partials):
    """The deferred expand inside the residual-add RMSNorm and SiLU-and-mul equals the expand kernel's
    torch twin applied first (rounded to the dtype where the expand rounds), then the plain op."""
    tokens, dim, inter = 5, 96, 40
    norm = layer_norm(dim, dtype)
    x, res = rand(tokens, dim, dtype=dtype, seed=1), rand(tokens, dim, dtype=dtype, seed=2)
    delta = make_delta(tokens, (dim,), dtype, partials)
    expanded = delta.applied(x, backend="torch")
    assert not torch.equal(expanded[0], x[0]) and torch.equal(expanded[1], x[1])  # token 1: no adapter
    with torch.no_grad():
        y, r = rms_norm(x, norm.weight, norm.eps, res, backend="triton", delta=delta)
        y_ref, r_ref = rms_norm(expanded, norm.weight, norm.eps, res, backend="torch")
        close(r, r_ref)
        close(y, y_ref)
        close(rms_norm(x, norm.weight, norm.eps, res, backend="torch", delta=delta)[0], y_ref)
    gate_up = rand(tokens, 2 * inter, dtype=dtype, seed=3)
    delta = make_delta(tokens, (inter, inter), dtype, partials)
    ref = silu_and_mul(delta.applied(gate_up, backend="torch"), backend="torch")
    # bf16: the expand rounds gate (the interpreter truncates), the product scales that by up: two apart
    tol = 4e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(silu_and_mul(gate_up, backend="triton", delta=delta).float(), ref.float(),
                               atol=tol, rtol=tol)
    close(silu_and_mul(gate_up, backend="torch", delta=delta), ref)


def make_shrink(tokens: int, n: int, dim: int, dtype: torch.dtype):
    """An early shrink over 3 slots (N = n columns of A, the last rows zero as a lower rank leaves
    them), token 1 on no adapter."""
    from loraplex.kernels.lora import LoRAShrink

    a = rand(3, n, dim, dtype=dtype, seed=13) * 0.1
    a[:, n - 4:] = 0
    slots = torch.tensor([(2 * t) % 3 if t != 1 else -1 for t in range(tokens)], dtype=torch.int32, device=DEVICE)
    return LoRAShrink(a, slots)


def shrunk(shrink) -> torch.Tensor:
    """The early shrink's result summed over its partials, on the LoRA rows (base rows are left undefined)."""
    h = shrink.h if shrink.h.dim() == 2 else shrink.h.sum(0)
    return h[shrink.token_slots >= 0]


def check_early_shrinks(tokens: int, dim: int, inter: int, n: int, dtype: torch.dtype) -> None:
    """RMSNorm (with and without the residual and a pending expand) and SiLU-and-mul computing the next
    layer's shrink, on the Triton path and the torch twins, against the BGMV shrink's torch twin over
    their output; the output itself unchanged."""
    from loraplex.kernels import lora_torch

    def check(shrink, y):
        want = lora_torch.bgmv_shrink(y, shrink.lora_a, shrink.token_slots)
        rows = shrink.token_slots[:tokens] >= 0
        torch.testing.assert_close(shrunk(shrink), want[rows], atol=1e-4 * (1 + dim // 256), rtol=1e-4)

    norm = layer_norm(dim, dtype)
    x, res = rand(tokens, dim, dtype=dtype, seed=1), rand(tokens, dim, dtype=dtype, seed=2)
    delta = make_delta(tokens, (dim,), dtype)
    with torch.no_grad():
        for backend in ("triton", "torch"):
            shrink = make_shrink(tokens, n, dim, dtype)
            y, r = rms_norm(x, norm.weight, norm.eps, res, backend=backend, delta=delta, shrink=shrink)
            y_ref, r_ref = rms_norm(x, norm.weight, norm.eps, res, backend="torch", delta=delta)
            close(y, y_ref)
            close(r, r_ref)
            check(shrink, y)
            y = rms_norm(x, norm.weight, norm.eps, backend=backend, shrink=shrink)
            check(shrink, y)
            gate_up = rand(tokens, 2 * inter, dtype=dtype, seed=3)
            shrink = make_shrink(tokens, n, inter, dtype)
            y = silu_and_mul(gate_up, backend=backend, shrink=shrink)
            close(y, silu_and_mul(gate_up, backend="torch"))
            assert shrink.h is not None and (backend == "torch" or shrink.h.shape[0] == -(-inter // 1024))
            check(shrink, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dim", "inter", "n"), [(96, 40, 48), (64, 1500, 16)])
def test_norm_and_silu_compute_the_next_layers_lora_shrink(dtype, dim, inter, n):
    """inter 1500 > 1024: SiLU's column blocks write partial sums."""
    check_early_shrinks(5, dim, inter, n, dtype)


def check_prologue_delta(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, qk_norm: bool,
                         partials: int) -> None:
    """The q/k/v projection's deferred LoRA expand inside the attention prologue (Triton, and the torch
    twin) against the expand's torch twin applied to qkv first, then the plain prologue: q and the cache."""
    block_size = 16
    num_blocks = -(-tokens // block_size) + 1
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    rope = rope_layer(head_dim)
    qkv = rand(tokens, q_size + 2 * kv_size, dtype=dtype, seed=4)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(6))[:tokens]
    slots = slots.to(torch.int32)
    slots[1 % tokens] = -1
    slots = slots.to(DEVICE)
    weights = ((rand(head_dim, dtype=dtype, seed=5) + 1, rand(head_dim, dtype=dtype, seed=6) + 1) if qk_norm
               else (None, None))
    delta = make_delta(tokens, (q_size, kv_size, kv_size), dtype, partials)
    expanded = delta.applied(qkv, backend="torch")
    results = {}
    with torch.no_grad():
        for name, backend, d, x in (("ref", "torch", None, expanded), ("triton", "triton", delta, qkv),
                                    ("twin", "torch", delta, qkv)):
            cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
            q = qk_norm_rope_write_kv(x, positions, rope.cos, rope.sin, cache[0], cache[1], slots, heads, kv_heads,
                                      *weights, eps=1e-6, backend=backend, delta=d)
            results[name] = (q, cache)
    # bf16: the expand rounds, then the norm and RoPE round again (the interpreter truncates): two apart
    tol = 4e-2 if dtype == torch.bfloat16 else 1e-5
    for name in ("triton", "twin"):
        for got, want in zip(results[name], results["ref"], strict=True):
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("partials", [1, 3])
def test_prologue_applies_the_pending_qkv_expand(dtype, qk_norm, partials):
    check_prologue_delta(5, 4, 2, 64, dtype, qk_norm, partials)
