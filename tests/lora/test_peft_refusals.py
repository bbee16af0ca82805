"""Every refusal of ``load_peft_adapter``: the right error class, a message naming the problem.

Each case mutates a private copy of a real PEFT adapter (``qkv_r4``: r=4, q/k/v, 2 layers), then
loads it; ``cfg`` overrides the LoRAConfig and ``spec`` changes the base model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.config import LoRAConfig
from loraplex.errors import AdapterLoadError, AdapterSourceForbiddenError
from loraplex.lora.peft import BaseModelSpec, load_peft_adapter
from tests.lora_factory import TMP_ROOTS, edit_adapter_config

ST = "adapter_model.safetensors"


def config(**changes: Any) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        edit_adapter_config(d, **changes)
    return mutate


def tensors(fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        save_file(fn(load_file(d / ST)), d / ST)
    return mutate


def rename(old: str, new: str) -> Callable[[Path], None]:
    return tensors(lambda t: {k.replace(old, new): v for k, v in t.items()})


def first_key(t: dict[str, torch.Tensor], part: str) -> str:
    return sorted(k for k in t if part in k)[0]


def with_nan(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = first_key(t, "lora_B")
    t[key] = t[key].clone()
    t[key][0, 0] = float("nan")
    return t


def with_extra(suffix: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Callable[[Path], None]:
    return tensors(lambda t: {**t, f"base_model.model.model.layers.0.{suffix}": torch.zeros(shape, dtype=dtype)})


def write(name: str, data: bytes) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / name).write_bytes(data)
    return mutate


def truncate(d: Path) -> None:
    with open(d / ST, "r+b") as f:
        f.truncate(os.path.getsize(d / ST) - 16)


def to_pickle(d: Path) -> None:
    torch.save(load_file(d / ST), d / "adapter_model.bin")
    os.remove(d / ST)


class Payload:
    """Unpickles by calling a function: what ``weights_only=True`` must refuse."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (os.getpid, ())


def unsafe_pickle(d: Path) -> None:
    torch.save({"x": Payload()}, d / "adapter_model.bin")
    os.remove(d / ST)


def drop(name: str) -> Callable[[Path], None]:
    return lambda d: os.remove(d / name)


E, F = AdapterLoadError, AdapterSourceForbiddenError
NEOX = "base_model.model.gpt_neox.layers.0.attention.query_key_value"
# id -> (mutation, cfg overrides, spec overrides, error class, message regex)
CASES: dict[str, tuple[Callable[[Path], None] | None, dict[str, Any], dict[str, Any], type, str]] = {
    "missing-config": (drop("adapter_config.json"), {}, {}, E, "adapter_config.json is missing"),
    "bad-json": (write("adapter_config.json", b'{"r": 4,'), {}, {}, E, "not valid JSON"),
    "json-not-object": (write("adapter_config.json", b"[1, 2]"), {}, {}, E, "JSON object"),
    "peft-type": (config(peft_type="PREFIX_TUNING"), {}, {}, E, "peft_type is 'PREFIX_TUNING'"),
    "dora": (config(use_dora=True), {}, {}, E, "DoRA"),
    "dora-key": (with_extra("self_attn.q_proj.lora_magnitude_vector.weight", (64,)), {}, {}, E, "DoRA"),
    "bias": (config(bias="lora_only"), {}, {}, E, "bias='lora_only'"),
    "lora-bias-key": (with_extra("self_attn.q_proj.lora_B.bias", (64,)), {}, {}, E, "LoRA bias"),
    "modules-to-save": (config(modules_to_save=["lm_head"]), {}, {}, E, "modules_to_save"),
    "embed-target": (config(target_modules=["embed_tokens", "q_proj"]), {}, {}, E, "embeddings / lm_head"),
    "lm-head-regex": (config(target_modules=r".*lm_head"), {}, {}, E, "embeddings / lm_head"),
    "embed-key": (tensors(lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}),
                  {}, {}, E, "embeddings / lm_head"),
    "other-arch-target": (config(target_modules=["c_attn"]), {}, {}, E, r"\['c_attn'\].*another architecture"),
    "regex-matches-nothing": (config(target_modules=r".*\.query_key_value"), {}, {}, E, "another architecture"),
    "no-targets": (config(target_modules=None), {}, {}, E, "target_modules=None"),
    "neox-keys": (rename("base_model.model.model.layers.0.self_attn.q_proj", NEOX), {}, {}, E,
                  "query_key_value.*another architecture"),
    "keys-not-under-layers": (rename("model.layers.0.self_attn", "transformer.h.0.attn"), {}, {}, E,
                              r"transformer\.h\.0.*not a LoRA weight of a decoder layer.*another architecture"),
    "wrong-parent": (rename("layers.0.self_attn", "layers.0.attention"), {}, {}, E, "another architecture"),
    "weights-not-in-targets": (config(target_modules=["q_proj"]), {}, {}, E, r"\['k_proj', 'v_proj'\].*not in"),
    "rank-over-max": (None, {"max_lora_rank": 2}, {}, E, "r=4 is above max_lora_rank=2"),
    "rank-pattern-over-max": (config(rank_pattern={"v_proj": 16}), {"max_lora_rank": 8}, {}, E,
                              r"rank_pattern\['v_proj'\]=16 is above max_lora_rank=8"),
    "bad-rank": (config(r=0), {}, {}, E, "r=0 must be a positive integer"),
    "config-rank-lies": (config(r=8), {}, {}, E, "rank 4 but adapter_config.json says r=8"),
    "bad-alpha": (config(lora_alpha="big"), {}, {}, E, "lora_alpha='big'"),
    "zero-alpha-pattern": (config(lora_alpha=0, alpha_pattern={"q_proj": 2}), {}, {}, E, "lora_alpha=0"),
    "bad-pattern-regex": (config(alpha_pattern={"q_proj(": 2}), {}, {}, E, "not a valid regex"),
    "shapes-other-base": (None, {}, {"module_shapes": {m: (128, 128) for m in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                               "gate_proj", "up_proj", "down_proj")}},
                          E, r"do not fit the base model, which needs A \[r, 128\]"),
    "layer-out-of-range": (None, {}, {"num_layers": 1}, E, "layer 1, but the base model has 1 layers"),
    "missing-b": (tensors(lambda t: {k: v for k, v in t.items() if k != first_key(t, "lora_B")}), {}, {}, E,
                  "has no matching lora_B"),
    "int-dtype": (tensors(lambda t: {k: (v.to(torch.int32) if k == first_key(t, "lora_A") else v)
                                     for k, v in t.items()}), {}, {}, E, "dtype I32"),
    "two-adapters": (tensors(lambda t: {**{k.replace(".weight", ".one.weight"): v for k, v in t.items() if "q_proj" in k},
                                        **{k.replace(".weight", ".two.weight"): v for k, v in t.items()
                                           if "q_proj" not in k}}), {}, {}, E, "several adapters"),
    "missing-weights": (drop(ST), {}, {}, E, "adapter_model.safetensors is missing"),
    "truncated": (truncate, {}, {}, E, "corrupt or truncated"),
    "garbage-header": (write(ST, b"\x20\x00\x00\x00\x00\x00\x00\x00{not a header}" + b" " * 64), {}, {}, E,
                       "corrupt or truncated"),
    "empty-file": (tensors(lambda t: {}), {}, {}, E, "holds no tensors"),
    "pickle-refused": (to_pickle, {}, {}, E, r"pickle weights \(adapter_model.bin\) are refused"),
    "unsafe-pickle": (unsafe_pickle, {"allow_pickle": True}, {}, E, r"weights_only=True"),
    "too-big": (None, {"max_adapter_bytes": 1000}, {}, E, "above max_adapter_bytes=1000"),
    "nan": (tensors(with_nan), {}, {}, E, "contains NaN or Inf"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refusal(case: str, copy_adapter: Any, base_spec: BaseModelSpec) -> None:
    mutate, cfg, spec, error, message = CASES[case]
    path = copy_adapter("qkv_r4")
    if mutate is not None:
        mutate(path)
    with pytest.raises(error, match=message) as info:
        load_peft_adapter("bad", str(path), dataclasses.replace(base_spec, **spec), LoRAConfig(**{"adapter_roots": TMP_ROOTS, **cfg}))
    assert type(info.value) is error and getattr(info.value, "name", None) == "bad"
    assert str(info.value).startswith("adapter 'bad': ")


@pytest.fixture
def roots(tmp_path: Path, copy_adapter: Any) -> tuple[Path, Path]:
    """``(root, outside)``: an allowed root with adapter ``root/good``, and an adapter outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    copy_adapter("qkv_r4", root / "good")
    copy_adapter("qkv_r4", outside)
    return root, outside


def symlinked_file(root: Path, outside: Path, name: str) -> Path:
    """``root/mixed``: a real adapter dir whose ``name`` is a symlink to the outside copy."""
    mixed = root / "mixed"
    mixed.mkdir()
    for f in ("adapter_config.json", ST):
        target = outside / f if f == name else root / "good" / f
        if f == name:
            os.symlink(target, mixed / f)
        else:
            (mixed / f).write_bytes(target.read_bytes())
    return mixed


# id -> source (``{root}`` / ``{outside}`` filled in), error class, message regex
# outside the roots and missing get one answer, so it reveals nothing about the disk
SOURCES: dict[str, tuple[str, type, str]] = {
    "dotdot": ("{root}/../outside", F, "not an adapter directory inside the allowed adapter roots"),
    "dotdot-relative-missing": ("{root}/good/../../../../etc", F, "not an adapter directory inside the allowed adapter roots"),
    "absolute-outside": ("{outside}", F, "not an adapter directory inside the allowed adapter roots"),
    "symlinked-dir": ("{root}/link", F, "not an adapter directory inside the allowed adapter roots"),
    "symlinked-weights": ("{root}/mixed", F, "adapter_model.safetensors in .* resolves outside"),
    "encoded-dotdot": ("{root}/%2e%2e/outside", F, "URL-encoded"),
    "encoded-slash": ("{root}/..%2Foutside", F, "URL-encoded"),
    "nul-byte": ("{root}/good\x00/../../outside", F, "NUL byte"),
    "url-scheme": ("file://{outside}", E, "URL scheme"),
    "empty": (" ", E, "source is empty"),
    "missing-dir": ("{root}/nope", F, "not an adapter directory inside the allowed adapter roots"),
}


@pytest.mark.parametrize("case", list(SOURCES))
def test_source_confinement(case: str, roots: tuple[Path, Path], base_spec: BaseModelSpec) -> None:
    root, outside = roots
    os.symlink(outside, root / "link")
    symlinked_file(root, outside, ST)
    source, error, message = SOURCES[case]
    cfg = LoRAConfig(adapter_roots=[str(root)])
    source = source.format(root=root, outside=outside)
    with pytest.raises(AdapterLoadError, match=message) as info:
        load_peft_adapter("bad", source, base_spec, cfg)
    reason = info.value.reason
    assert type(info.value) is error
    assert str(outside) in source or str(outside) not in reason  # symlink targets stay secret


def test_symlinked_config_outside_is_refused(roots: tuple[Path, Path], base_spec: BaseModelSpec) -> None:
    root, outside = roots
    mixed = symlinked_file(root, outside, "adapter_config.json")
    with pytest.raises(F, match="adapter_config.json in .* resolves outside"):
        load_peft_adapter("bad", str(mixed), base_spec, LoRAConfig(adapter_roots=[str(root)]))


def test_allowed_sources(roots: tuple[Path, Path], base_spec: BaseModelSpec) -> None:
    root, outside = roots
    os.symlink(root / "good", root / "inner-link")  # a symlink that stays inside is fine
    for source in (root / "good", root / "inner-link", root / "good" / ".." / "good"):
        load_peft_adapter("ok", str(source), base_spec, LoRAConfig(adapter_roots=[str(root)]))
    with pytest.raises(AdapterSourceForbiddenError):  # no roots: no local path at all
        load_peft_adapter("ok", str(outside), base_spec, LoRAConfig())


def test_nothing_read_before_validation(copy_adapter: Any, base_spec: BaseModelSpec,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused config never opens the weights file."""
    path = copy_adapter("qkv_r4")
    edit_adapter_config(path, use_dora=True)
    opened = []
    monkeypatch.setattr("loraplex.lora.peft.safe_open", lambda *a, **k: opened.append(a))
    with pytest.raises(E):
        load_peft_adapter("bad", str(path), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))
    assert opened == []
    assert json.loads((path / "adapter_config.json").read_text())["use_dora"] is True
