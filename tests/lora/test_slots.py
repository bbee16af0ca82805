"""GPU slots: the padded, stacked layout the kernels rely on, checked element by element and
against PEFT's own forward."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from loraplex.config import LoRAConfig
from loraplex.errors import AdapterLoadError
from loraplex.lora.peft import BaseModelSpec, LoRAWeights, load_peft_adapter
from loraplex.lora.slots import LoRASlots, LoRATarget, targets_from_spec
from tests.lora_factory import TMP_ROOTS

R = 8


@pytest.fixture
def slots(base_spec: BaseModelSpec) -> LoRASlots:
    return LoRASlots(targets_from_spec(base_spec.num_layers, base_spec.module_shapes), max_loras=3, max_rank=R)


def load(adapter_store: dict[str, Path], name: str, spec: BaseModelSpec) -> LoRAWeights:
    return load_peft_adapter(name, str(adapter_store[name]), spec, LoRAConfig(adapter_roots=TMP_ROOTS))


def expected_slot(target: LoRATarget, w: LoRAWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented layout, built independently: ``(A [n*R, in], B [sum(out), R])``."""
    a = torch.zeros(len(target.modules) * R, target.in_features)
    b = torch.zeros(sum(target.out_slices), R)
    off = 0
    for i, (module, out) in enumerate(zip(target.modules, target.out_slices, strict=True)):
        if (target.layer, module) in w.weights:
            A, B = w.weights[(target.layer, module)]
            a[i * R:i * R + A.shape[0]] = A
            b[off:off + out, :B.shape[1]] = B
        off += out
    return a, b


def test_targets_and_buffer_shapes(slots: LoRASlots, base_spec: BaseModelSpec) -> None:
    qkv = slots.targets[0]
    assert (qkv.layer, qkv.group, qkv.modules) == (0, "qkv_proj", ("q_proj", "k_proj", "v_proj"))
    assert qkv.out_slices == (64, 32, 32) and qkv.in_features == 64
    lora_a, lora_b = slots.buffers(1, "gate_up_proj")
    assert lora_a.shape == (3, 2 * R, 64) and lora_b.shape == (3, 2 * 96, R)
    assert slots.buffers(0, "down_proj")[0].shape == (3, R, 96)
    assert slots.scales.shape == (3,) and slots.scales.dtype == torch.float32
    assert slots.nbytes == 12 + sum(a.nbytes + b.nbytes for a, b in
                                    (slots.buffers(t.layer, t.group) for t in slots.targets))


def test_two_adapters_padded_layout(slots: LoRASlots, adapter_store: dict[str, Path],
                                    base_spec: BaseModelSpec) -> None:
    qkv, mlp = load(adapter_store, "qkv_r4", base_spec), load(adapter_store, "mlp_r2", base_spec)
    slots.load(0, qkv)
    slots.load(2, mlp)
    for t in slots.targets:
        lora_a, lora_b = slots.buffers(t.layer, t.group)
        for slot, w in ((0, qkv), (2, mlp)):
            a, b = expected_slot(t, w)
            assert torch.equal(lora_a[slot], a) and torch.equal(lora_b[slot], b), (slot, t)
        assert not lora_a[1].any() and not lora_b[1].any()
    assert slots.scales.tolist() == [qkv.scale, 0.0, mlp.scale]
    assert slots.ranks == [4, 0, 2]
    # q of qkv_r4 is really there, rows past the rank and untargeted groups are zero
    lora_a, _ = slots.buffers(0, "qkv_proj")
    assert lora_a[0, :4].any() and not lora_a[0, 4:R].any()
    assert not slots.buffers(0, "down_proj")[0][0].any()


def test_reload_zeroes_previous_adapter_and_clear(slots: LoRASlots, adapter_store: dict[str, Path],
                                                  base_spec: BaseModelSpec) -> None:
    big, small = load(adapter_store, "all_r8_rs", base_spec), load(adapter_store, "o_r3", base_spec)
    slots.load(1, big)
    slots.load(1, small)
    for t in slots.targets:
        a, b = expected_slot(t, small)
        lora_a, lora_b = slots.buffers(t.layer, t.group)
        assert torch.equal(lora_a[1], a) and torch.equal(lora_b[1], b)
    slots.clear(1)
    assert all(not slots.buffers(t.layer, t.group)[0].any() for t in slots.targets)
    assert slots.scales[1] == 0 and slots.ranks[1] == 0
    with pytest.raises(IndexError):
        slots.clear(-1)


def test_refused_weights_leave_slot_unchanged(slots: LoRASlots, adapter_store: dict[str, Path],
                                              base_spec: BaseModelSpec) -> None:
    w = load(adapter_store, "qkv_r4", base_spec)
    slots.load(0, w)
    before = [t.clone() for t in slots.buffers(0, "qkv_proj")]
    small = LoRASlots(targets_from_spec(2, base_spec.module_shapes), max_loras=1, max_rank=2)
    with pytest.raises(AdapterLoadError, match="do not fit the slot"):
        small.load(0, w)
    attn_only = LoRASlots([t for t in slots.targets if t.group != "qkv_proj"], max_loras=1, max_rank=R)
    with pytest.raises(AdapterLoadError, match="not a LoRA target"):
        attn_only.load(0, w)
    bad = copy.copy(w)
    bad.weights = {(0, "q_proj"): (torch.ones(4, 64), torch.ones(65, 4))}
    with pytest.raises(AdapterLoadError, match="do not fit"):
        slots.load(0, bad)
    assert all(torch.equal(x, y) for x, y in zip(before, slots.buffers(0, "qkv_proj"), strict=True))


def slot_delta(slots: LoRASlots, slot: int, t: LoRATarget, x: torch.Tensor) -> torch.Tensor:
    """The kernels' op in torch: x [T, in] -> delta [T, sum(out)] for tokens of ``slot``."""
    lora_a, lora_b = slots.buffers(t.layer, t.group)
    parts, off = [], 0
    for i, out in enumerate(t.out_slices):
        a, b = lora_a[slot, i * R:(i + 1) * R], lora_b[slot, off:off + out]
        parts.append(slots.scales[slot] * (x @ a.float().T) @ b.float().T)
        off += out
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_reproduces_peft_forward(dtype: torch.dtype, tiny_model: PreTrainedModel, base_spec: BaseModelSpec,
                                        adapter_store: dict[str, Path]) -> None:
    slots = LoRASlots(targets_from_spec(2, base_spec.module_shapes), max_loras=2, max_rank=R, dtype=dtype)
    slots.load(1, load(adapter_store, "all_r8_rs", base_spec))
    peft_model: Any = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(adapter_store["all_r8_rs"]))
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(0))
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for t in slots.targets:
        layer: Any = peft_model.base_model.model.model.layers[t.layer]
        parent = layer.mlp if t.group in ("gate_up_proj", "down_proj") else layer.self_attn
        xin = x[:, :t.in_features]
        with torch.no_grad():
            ref = torch.cat([getattr(parent, m)(xin) - getattr(parent, m).base_layer(xin) for m in t.modules], -1)
        torch.testing.assert_close(slot_delta(slots, 1, t, xin), ref, rtol=tol, atol=tol)
        assert not slot_delta(slots, 0, t, xin).any()
