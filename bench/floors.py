"""Byte and FLOP floors of a generate run, from ceilings measured on the device in the same run.

A decode step must read every weight once and every live token's K/V once
(plus each distinct adapter's A/B); prefill is charged its matmul FLOPs.
"""

from __future__ import annotations

import time

import torch


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (2 GiB buffers)."""
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t)
    del x, y
    return bw


def matmul_flops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t)


def weight_bytes(s: dict) -> int:
    """bf16 bytes of every matrix a decode step reads: the layers' projections and the LM head."""
    h, i, hd = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return 2 * (s["num_hidden_layers"] * per_layer + s["vocab_size"] * h)


def kv_bytes_per_token(s: dict) -> int:
    return 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * s["head_dim"] * 2


def lora_bytes(s: dict, rank: int) -> int:
    """bf16 A and B of one adapter on all 7 projections."""
    h, i, hd = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    dims = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return 2 * s["num_hidden_layers"] * rank * sum(a + b for a, b in dims)


def floor_seconds(s: dict, prompts: list[int], outputs: list[int], bw: float, flops: float,
                  adapter_bytes: int = 0) -> float:
    """Every request running from the start (the most favourable schedule): a lower bound on time."""
    w, kv = weight_bytes(s) + adapter_bytes, kv_bytes_per_token(s)
    t = 2 * (w // 2) * sum(prompts) / flops  # prefill compute
    for step in range(max(outputs)):
        live = sum(p + step for p, o in zip(prompts, outputs, strict=True) if step < o)
        t += (w + kv * live) / bw
    return t
