"""GPU adapter slots: every LoRA-able layer's weights for ``max_loras`` adapters, stacked.

Layout (fixed; the kernels rely on it). For a target (one possibly fused linear) with
modules ``m_0..m_{n-1}``, output sizes ``out_i``, offsets ``off_i = sum(out_0..out_{i-1})`` and
``R = max_rank``::

    lora_a: [max_loras, n*R, in]          A_i [r, in]    -> lora_a[s, i*R : i*R + r, :]
    lora_b: [max_loras, sum(out), R]      B_i [out_i, r] -> lora_b[s, off_i : off_i + out_i, :r]
    scales: [max_loras] float32           (shared by all targets)

and zeros everywhere else (rows past the rank, modules the adapter does not target, free
slots), so for token x in slot s the delta of module i is
``scales[s] * (x @ lora_a[s, i*R:(i+1)*R].T) @ lora_b[s, off_i:off_i+out_i].T``.

On CUDA every write to a slot (fill, clear) runs on one side stream, after the work already
enqueued on the compute stream (the default stream, where steps run), so a slot is never
rewritten under a step still reading its previous adapter; ``fill`` returns at once with the
event recorded after its copies, and a step that reads the slot first waits on that event
(``SlotFill.order_before``). Host copies (``host_copy``) are in the slot dtype and in pinned
memory, so the copies are asynchronous DMA. On CPU the same calls write synchronously.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from loraplex.errors import AdapterLoadError
from loraplex.lora.peft import LoRAWeights
from loraplex.lora.types import PACKED_MODULES

GROUPS: dict[str, tuple[str, ...]] = {group: modules for group, (_, modules) in PACKED_MODULES.items()}


@dataclass(frozen=True)
class LoRATarget:
    """One LoRA-able linear of the model, possibly fused from several projections."""

    layer: int
    group: str  # "qkv_proj" (q,k,v fused), "o_proj", "gate_up_proj" (gate,up fused), "down_proj"
    modules: tuple[str, ...]  # e.g. ("q_proj", "k_proj", "v_proj")
    in_features: int
    out_slices: tuple[int, ...]  # output size per module

    def offsets(self) -> list[int]:
        """Start row of each module's output in the fused output."""
        return [sum(self.out_slices[:i]) for i in range(len(self.out_slices))]


class SlotFill:
    """A slot write: complete on return on CPU; on CUDA enqueued, with the event recorded after it."""

    def __init__(self, event: torch.cuda.Event | None = None):
        self.event = event

    def done(self) -> bool:
        """The write has completed (never blocks)."""
        return self.event is None or bool(self.event.query())

    def order_before(self) -> None:
        """Work enqueued on the current stream from now on runs after the write (no host wait)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


class LoRASlots:
    """Stacked per-slot LoRA buffers for every target, plus one scale per slot."""

    def __init__(self, targets: list[LoRATarget], max_loras: int, max_rank: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.targets = list(targets)
        self.max_loras, self.max_rank = max_loras, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        self._by_key: dict[tuple[int, str], tuple[LoRATarget, torch.Tensor, torch.Tensor]] = {}
        self._by_module: dict[tuple[int, str], tuple[LoRATarget, int]] = {}
        for t in self.targets:
            if (t.layer, t.group) in self._by_key:
                raise ValueError(f"duplicate LoRA target layer={t.layer} group={t.group}")
            if len(t.modules) != len(t.out_slices):
                raise ValueError(f"target {t}: one out_slice per module expected")
            lora_a = torch.zeros(max_loras, len(t.modules) * max_rank, t.in_features, dtype=dtype, device=device)
            lora_b = torch.zeros(max_loras, sum(t.out_slices), max_rank, dtype=dtype, device=device)
            self._by_key[(t.layer, t.group)] = (t, lora_a, lora_b)
            for i, module in enumerate(t.modules):
                self._by_module[(t.layer, module)] = (t, i)
        self.scales = torch.zeros(max_loras, dtype=torch.float32, device=device)  # [max_loras]
        self.ranks = [0] * max_loras  # rank of the adapter in each slot; 0 = empty
        cuda = self.device.type == "cuda"
        self._compute = torch.cuda.current_stream(self.device) if cuda else None  # where steps run
        self._fill_stream = torch.cuda.Stream(self.device) if cuda else None

    def buffers(self, layer: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_a [max_loras, n*R, in], lora_b [max_loras, sum(out_slices), R])`` of one target."""
        _t, lora_a, lora_b = self._by_key[(layer, group)]
        return lora_a, lora_b

    @property
    def nbytes(self) -> int:
        """Device bytes held by all buffers and the scales."""
        return self.scales.nbytes + sum(a.nbytes + b.nbytes for _t, a, b in self._by_key.values())

    def check(self, w: LoRAWeights) -> None:
        """Refuses weights that do not fit these targets (module missing, shapes, rank > R)."""
        for (layer, module), (a, b) in w.weights.items():
            if (layer, module) not in self._by_module:
                raise AdapterLoadError(w.name, f"layer {layer} {module} is not a LoRA target of the model")
            t, i = self._by_module[(layer, module)]
            r = a.shape[0]
            if r > self.max_rank or a.shape != (r, t.in_features) or b.shape != (t.out_slices[i], r):
                raise AdapterLoadError(w.name, f"layer {layer} {module}: A {list(a.shape)} / B {list(b.shape)} do "
                                               f"not fit the slot (in={t.in_features}, out={t.out_slices[i]}, "
                                               f"max rank {self.max_rank})")

    def host_copy(self, w: LoRAWeights) -> LoRAWeights:
        """``w`` as the host cache keeps it: in the slot dtype, every tensor a view of one flat buffer,
        pinned when the slots are on CUDA (so that fills are asynchronous copies)."""
        pin = self.device.type == "cuda"
        if not pin and all(a.dtype == self.dtype for pair in w.weights.values() for a in pair):
            return w
        flat = torch.empty(sum(a.numel() + b.numel() for a, b in w.weights.values()), dtype=self.dtype,
                           pin_memory=pin)
        weights, offset = {}, 0
        for key, pair in w.weights.items():
            views = []
            for t in pair:
                view = flat[offset:offset + t.numel()].view(t.shape)
                view.copy_(t)
                views.append(view)
                offset += t.numel()
            weights[key] = (views[0], views[1])
        return dataclasses.replace(w, weights=weights, nbytes=flat.nbytes)

    def fill(self, slot: int, w: LoRAWeights) -> SlotFill:
        """Writes adapter ``w`` into ``slot`` (zeroed first) and sets its scale, without waiting.

        On CUDA the copies go on the fill stream after the compute stream's work so far; the result's
        event marks their end. Elsewhere this is ``load``. Refused weights leave the slot as it was.
        """
        if self.device.type != "cuda":
            self.load(slot, w)
            return SlotFill()
        self.check(w)
        self._check_slot(slot)
        with self._on_fill_stream() as fill:
            self._zero(slot)
            self._copy(slot, w)
        return fill

    def load(self, slot: int, w: LoRAWeights) -> None:
        """Writes adapter ``w`` into ``slot`` (zeroed first) and sets its scale; work enqueued later on
        the current stream sees the whole write. Checks everything before touching the slot, so a
        refused adapter leaves it as it was."""
        if self.device.type == "cuda":
            self.fill(slot, w).order_before()
            return
        self.check(w)
        self._check_slot(slot)
        self._zero(slot)
        self._copy(slot, w)

    def clear(self, slot: int) -> None:
        """Zeroes ``slot`` in every buffer and its scale (on CUDA on the fill stream, after any fill)."""
        self._check_slot(slot)
        with self._on_fill_stream():
            self._zero(slot)

    def _copy(self, slot: int, w: LoRAWeights) -> None:
        """A few launches whatever the layer count: a host copy that views one pinned buffer goes to the
        device in one transfer, and the slot views are written from it by one multi-tensor copy
        (``_foreach_copy_``) instead of one copy per module (~400 launches for a 28-layer model)."""
        R = self.max_rank
        dsts, srcs = [], []
        for (layer, module), (a, b) in w.weights.items():
            t, i = self._by_module[(layer, module)]
            _t, lora_a, lora_b = self._by_key[(layer, t.group)]
            r, off = a.shape[0], t.offsets()[i]
            dsts += [lora_a[slot, i * R:i * R + r, :], lora_b[slot, off:off + t.out_slices[i], :r]]
            srcs += [a, b]
        dense: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for d, s in zip(dsts, self._staged(srcs), strict=True):
            if d.is_contiguous() and s.is_contiguous() and d.device == s.device and d.dtype == s.dtype:
                dense[0].append(d)
                dense[1].append(s)
            else:  # ranks below R (strided B views), other dtypes or devices
                d.copy_(s, non_blocking=True)
        if dense[0]:
            torch._foreach_copy_(*dense, non_blocking=True)
        self.scales[slot] = w.scale
        self.ranks[slot] = w.rank

    def _staged(self, srcs: list[torch.Tensor]) -> list[torch.Tensor]:
        """On CUDA, host tensors that all view one pinned buffer (``host_copy``'s layout): that buffer
        sent whole, in one asynchronous copy on the current stream, and the same views of the device
        copy. Anything else is returned as it is."""
        if self.device.type != "cuda" or not srcs:
            return srcs
        storage = srcs[0].untyped_storage()
        ptr = storage.data_ptr()
        if not all(s.device.type == "cpu" and s.is_pinned() and s.dtype == self.dtype
                   and s.untyped_storage().data_ptr() == ptr for s in srcs):
            return srcs
        host = srcs[0].new_empty(0).set_(storage, 0, (storage.nbytes() // srcs[0].element_size(),), (1,))
        dev = host.to(self.device, non_blocking=True)  # allocated on, and only used on, this stream
        return [dev.as_strided(s.shape, s.stride(), s.storage_offset()) for s in srcs]

    def _zero(self, slot: int) -> None:
        torch._foreach_zero_([t[slot] for _t, lora_a, lora_b in self._by_key.values() for t in (lora_a, lora_b)])
        self.scales[slot] = 0.0
        self.ranks[slot] = 0

    @contextmanager
    def _on_fill_stream(self) -> Iterator[SlotFill]:
        """CUDA: the body's work goes on the fill stream, after the compute stream's work so far, and the
        yielded fill gets the event recorded after it. Elsewhere the body simply runs."""
        fill = SlotFill()
        if self._fill_stream is None or self._compute is None:
            yield fill
            return
        self._fill_stream.wait_stream(self._compute)
        with torch.cuda.stream(self._fill_stream):
            yield fill
            fill.event = torch.cuda.Event(blocking=True)
            fill.event.record(self._fill_stream)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise IndexError(f"slot {slot} out of range [0, {self.max_loras})")


def targets_from_spec(num_layers: int, module_shapes: dict[str, tuple[int, int]]) -> list[LoRATarget]:
    """The standard fused targets (qkv, o, gate_up, down) of every layer, from per-module shapes.

    ``module_shapes["q_proj"] = (in_features, out_features)``, as in ``BaseModelSpec``.
    """
    out = []
    for layer in range(num_layers):
        for group, modules in GROUPS.items():
            in_features = module_shapes[modules[0]][0]
            out.append(LoRATarget(layer, group, modules, in_features, tuple(module_shapes[m][1] for m in modules)))
    return out
