"""A linear layer (possibly fused from several projections) that adds each token's LoRA delta.

The base weights are plain; the LoRA buffers are views into the slot manager's
stacked tensors, attached once at start-up. Which slot each token uses comes
from the forward context, so the model files never see adapters.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from loraplex.backend.layers.context import get_context
from loraplex.kernels.lora import add_lora, warmup


class LoRALinear(nn.Module):
    # Compile every LoRA kernel variant of a layer shape when its buffers attach (CUDA only), so no
    # batch compiles one while serving; tests that build many engines may turn it off.
    warm_kernels: ClassVar[bool] = True
    _warmed: ClassVar[set[tuple]] = set()

    def __init__(self, in_features: int, out_slices: tuple[int, ...], bias: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_slices = tuple(out_slices)
        out = sum(out_slices)
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out, dtype=dtype), requires_grad=False) if bias else None
        self.lora_a: torch.Tensor | None = None  # [S, n*R, in]
        self.lora_b: torch.Tensor | None = None  # [S, sum(out_slices), R]
        self.lora_scales: torch.Tensor | None = None  # [S] float32

    def set_lora(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor) -> None:
        self.lora_a, self.lora_b, self.lora_scales = lora_a, lora_b, scales
        key = (tuple(lora_a.shape), tuple(lora_b.shape), self.out_slices, lora_a.dtype, str(lora_a.device))
        if lora_a.is_cuda and self.warm_kernels and key not in self._warmed:
            LoRALinear._warmed.add(key)
            with torch.inference_mode():
                warmup(lora_a, lora_b, scales, self.out_slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        meta = get_context().lora
        if meta is not None and self.lora_a is not None and not meta.no_lora:
            assert self.lora_b is not None and self.lora_scales is not None
            add_lora(y, x, self.lora_a, self.lora_b, self.lora_scales, self.out_slices, meta)
        return y
