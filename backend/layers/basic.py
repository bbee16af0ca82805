"""Small layers shared by the model files: RMSNorm, rotary embedding, SiLU-gated MLP activation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraplex.errors import UnsupportedModelError
from loraplex.kernels import fused
from loraplex.kernels.gemv import skinny_linear

if TYPE_CHECKING:
    from loraplex.kernels.lora import LoRADelta, LoRAShrink


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, shrink: LoRAShrink | None = None) -> torch.Tensor:
        """norm(x); ``shrink``: the LoRA shrink of the projection that reads the result, computed in the
        same kernel (``LoRALinear.early_shrink``)."""
        out = fused.rms_norm(x, self.weight, self.eps, shrink=shrink)
        assert isinstance(out, torch.Tensor)
        return out

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, delta: LoRADelta | None = None,
                 shrink: LoRAShrink | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), one fused kernel on CUDA; ``delta``: the pending LoRA
        expand of the projection that made x, added to x first (in the same kernel); ``shrink`` as in
        forward."""
        out = fused.rms_norm(x, self.weight, self.eps, residual, delta=delta, shrink=shrink)
        assert isinstance(out, tuple)
        return out


class Linear(nn.Linear):
    """nn.Linear whose product is ``skinny_linear``: the Triton skinny GEMM for a few rows on a GPU
    where the measured table says it beats cuBLAS (the LM head at decode), F.linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)


def silu_and_mul(gate_up: torch.Tensor, delta: LoRADelta | None = None,
                 shrink: LoRAShrink | None = None) -> torch.Tensor:
    return fused.silu_and_mul(gate_up, delta=delta, shrink=shrink)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with HF's rope types (default, linear, llama3, yarn, ...).

    cos/sin are precomputed for every position up to ``max_positions``.
    """

    cos: torch.Tensor  # [max_positions, D] buffers (typed here: nn.Module's __getattr__ is not)
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_scaling, persistent=False)
        self.head_dim = head_dim

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q: [T, H, D] and k: [T, Hkv, D] in place at ``positions`` [T] (math in float32)."""
        return fused.rotary_embedding(positions, q, k, self.cos, self.sin)


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The model's rope settings as one dict (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return params


def build_rope(hf_config: Any, head_dim: int, max_positions: int) -> RotaryEmbedding:
    params = rope_parameters(hf_config)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params["rope_theta"])
    partial = float(getattr(hf_config, "partial_rotary_factor", 1.0))
    dim = int(head_dim * partial)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type != "default":
        inv_freq, scaling = _hf_rope(hf_config, rope_type)
    return RotaryEmbedding(head_dim, max_positions, inv_freq, scaling)


def _hf_rope(hf_config: Any, rope_type: str) -> tuple[torch.Tensor, float]:
    """Other rope types (llama3, yarn, longrope, dynamic...) through transformers' own init functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; known: {sorted(ROPE_INIT_FUNCTIONS)}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq, float(scaling) if not isinstance(scaling, torch.Tensor) else float(scaling.item())
