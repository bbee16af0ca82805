"""A linear layer (possibly fused from several projections) that adds each token's LoRA delta.

The base product is ``kernels.gemv.skinny_linear``: cuBLAS, or on a GPU for a few rows (decode) the
Triton skinny GEMM where its measured table says it is faster.

The base weights are plain; the LoRA buffers are views into the slot manager's
stacked tensors, attached once at start-up. Which slot each token uses comes
from the forward context, so the model files never see adapters.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from loraplex.backend.layers.context import get_context
from loraplex.kernels.gemv import skinny_linear
from loraplex.kernels.lora import (
    LoRABatchMeta,
    LoRADelta,
    LoRAShrink,
    LoRATiles,
    expand,
    fused_lora,
    lora_buffer,
    route,
    shrink,
    warmup,
)

Mode = Literal["fused", "overlap", "serial"]


class LoRALinear(nn.Module):
    # Compile every LoRA kernel variant of a layer shape (in the current mode) when its buffers attach (CUDA only), so no
    # batch compiles one while serving; tests that build many engines may turn it off.
    warm_kernels: ClassVar[bool] = True
    # How a LoRA delta is computed, for every layer of the process (benches and tests switch it):
    #   overlap  (default) shrink and expand kernels; while a CUDA graph is captured (decode) the shrink runs
    #            on a side stream beside the base GEMM (x is all it needs), joined before the expand: the
    #            graph gets two branches and the shrink's latency hides behind the GEMM; eagerly as serial;
    #   fused    one kernel per layer and step, shrink and expand in the same program (kernels.lora.fused_lora):
    #            half the launches;
    #   serial   shrink then expand on one stream.
    # Measured on the H200 (BENCHMARKS.md, round 4): overlap took a 32-request Qwen3-0.6B decode from 3.18 to
    # 3.02 ms a step with 32 adapters against serial. Fused is faster per decoder layer in a graph replay
    # (32 tokens: 34.8 -> 28.0 us against serial) but not in the engine: 3.37 ms a step with 32 adapters against
    # 3.10 for overlap, the same with one adapter; for Llama-3-8B's wider inputs it loses per layer too.
    # Fused halves the Triton launches of eager (prefill and mixed) steps, whose host cost is ~77 us each;
    # what that is worth end to end is not measured yet, so it is not the default.
    mode: ClassVar[Mode] = "overlap"
    # forward_deferred may leave a BGMV expand (decode, small steps) to the op that consumes the output
    # (the residual-add RMSNorm, SiLU-and-mul): a launch fewer per LoRA layer. Benches switch it off to compare.
    defer_expand: ClassVar[bool] = True
    # early_shrink hands a BGMV shrink (decode, small steps) to the op that makes the layer's input (the RMSNorm
    # before qkv and gate_up, SiLU-and-mul before down): a launch fewer per LoRA layer, and no side-stream fork.
    # Benches switch it off to compare.
    shrink_early: ClassVar[bool] = True
    _warmed: ClassVar[set[tuple]] = set()
    _side_streams: ClassVar[dict[torch.device, torch.cuda.Stream]] = {}

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
        """Attaches the slot stacks (checked here once: ``forward`` runs the LoRA ops without add_lora's checks)."""
        n, s = len(self.out_slices), lora_a.shape[0]
        if (lora_a.dim() != 3 or lora_a.shape[1:] != (n * lora_b.shape[2], self.in_features)
                or lora_b.shape[:2] != (s, sum(self.out_slices)) or scales.shape != (s,)
                or scales.dtype != torch.float32):
            raise ValueError(f"LoRA buffers a {tuple(lora_a.shape)}, b {tuple(lora_b.shape)}, scales "
                             f"{scales.dtype} {tuple(scales.shape)} do not fit in={self.in_features}, "
                             f"out_slices={self.out_slices}")
        self.lora_a, self.lora_b, self.lora_scales = lora_a, lora_b, scales
        if not lora_a.is_cuda:
            return
        if lora_a.device not in self._side_streams:  # made here: not while a graph is being captured
            LoRALinear._side_streams[lora_a.device] = torch.cuda.Stream(lora_a.device)
        # only the kernels of the mode set now (a mode switched later compiles its kernels on first use)
        fused = self.mode == "fused"
        key = (tuple(lora_a.shape), tuple(lora_b.shape), self.out_slices, lora_a.dtype, str(lora_a.device), fused)
        if self.warm_kernels and key not in self._warmed:
            LoRALinear._warmed.add(key)
            with torch.inference_mode():
                warmup(lora_a, lora_b, scales, self.out_slices, fused=fused)

    def early_shrink(self) -> LoRAShrink | None:
        """The shrink of this layer's next forward, for the op that makes its input to compute
        (``fused.rms_norm``, ``fused.silu_and_mul``), then to hand back as ``forward(x, shrunk)``:
        when that forward takes the BGMV route in a two-kernel mode; else None (the layer shrinks)."""
        meta = get_context().lora
        if not self.shrink_early or meta is None or self.lora_a is None or meta.no_lora or self.mode == "fused":
            return None
        assert self.lora_b is not None
        if route(meta, self.lora_a, self.lora_b.shape[2]) is not None:
            return None
        return LoRAShrink(self.lora_a, meta.token_slots)

    def forward(self, x: torch.Tensor, shrunk: LoRAShrink | None = None) -> torch.Tensor:
        """y = x W^T (+ bias) + each token's LoRA delta; shrunk: this step's shrink of x from
        ``early_shrink``, already computed by x's producer."""
        meta = get_context().lora
        if meta is None or self.lora_a is None or meta.no_lora:
            return skinny_linear(x, self.weight, self.bias)  # F.linear, or the skinny GEMM where faster
        assert self.lora_b is not None and self.lora_scales is not None
        if shrunk is not None and shrunk.h is not None:  # the BGMV route (early_shrink)
            y = skinny_linear(x, self.weight, self.bias)
            expand(y, shrunk.h, self.lora_b, self.lora_scales, self.out_slices, meta, None)
            return y
        tiles = route(meta, self.lora_a, self.lora_b.shape[2])  # add_lora's path (shapes checked in set_lora)
        mode = self.mode
        if mode == "overlap" and x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self._overlapped(x, meta, tiles)
        y = skinny_linear(x, self.weight, self.bias)
        if mode == "fused":
            fused_lora(y, x, self.lora_a, self.lora_b, self.lora_scales, self.out_slices, meta, tiles)
        else:
            expand(y, shrink(x, self.lora_a, meta, tiles), self.lora_b, self.lora_scales, self.out_slices, meta,
                   tiles)
        return y

    def forward_deferred(self, x: torch.Tensor, shrunk: LoRAShrink | None = None
                         ) -> tuple[torch.Tensor, LoRADelta | None]:
        """(y without its LoRA delta, the delta) when the expand can wait for the consumer's kernel (a
        BGMV route, two-kernel modes, no forward hooks such as tensor parallelism's all-reduce, which
        must see the whole output); else (forward(x, shrunk), None). On CPU the consumer's torch twin
        applies the delta with the same expand, so CPU tests run this path too."""
        meta = get_context().lora
        if (not self.defer_expand or meta is None or self.lora_a is None or meta.no_lora
                or self.mode == "fused" or self._forward_hooks):
            return self(x, shrunk), None
        assert self.lora_b is not None and self.lora_scales is not None
        if shrunk is not None and shrunk.h is not None:  # the BGMV route (early_shrink)
            y = skinny_linear(x, self.weight, self.bias)
            return y, LoRADelta(shrunk.h, self.lora_b, self.lora_scales, self.out_slices, meta.token_slots)
        if route(meta, self.lora_a, self.lora_b.shape[2]) is not None:  # SGMV: expand in place
            return self(x), None
        if self.mode == "overlap" and x.is_cuda and torch.cuda.is_current_stream_capturing():
            y, h = self._overlapped(x, meta, None, expand_now=False)
        else:
            y = skinny_linear(x, self.weight, self.bias)
            h = shrink(x, self.lora_a, meta, None)
        return y, LoRADelta(h, self.lora_b, self.lora_scales, self.out_slices, meta.token_slots)

    def _overlapped(self, x: torch.Tensor, meta: LoRABatchMeta, tiles: LoRATiles | None,
                    expand_now: bool = True) -> Any:
        """Fork: shrink on the side stream, base GEMM here; join; expand (or return (y, h) without).
        Every allocation and the SGMV tile table (``route``) are made on this stream, before the fork."""
        assert self.lora_a is not None and self.lora_b is not None and self.lora_scales is not None
        buf = lora_buffer(x.shape[0], self.lora_a)
        main, side = torch.cuda.current_stream(), self._side_streams[x.device]
        side.wait_stream(main)
        with torch.cuda.stream(side):
            h = shrink(x, self.lora_a, meta, tiles, buf)
        y = skinny_linear(x, self.weight, self.bias)
        main.wait_stream(side)
        if not expand_now:
            return y, h
        expand(y, h, self.lora_b, self.lora_scales, self.out_slices, meta, tiles)
        return y
