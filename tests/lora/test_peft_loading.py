"""Loading real PEFT adapters: weights and scales match PEFT's own; supported config forms load."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from loraplex.config import LoRAConfig
from loraplex.lora import peft_source
from loraplex.lora.peft import BaseModelSpec, load_peft_adapter, resolve_adapter_source
from tests.lora_factory import (
    TMP_ROOTS,
    edit_adapter_config,
    make_peft_adapter,
    make_tiny_model,
    peft_lora_weights,
)

ALL = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def rewrite_keys(adapter_dir: Path, rename: Any) -> None:
    """Renames every key of adapter_model.safetensors with ``rename(key) -> key``."""
    path = adapter_dir / "adapter_model.safetensors"
    save_file({rename(k): v for k, v in load_file(path).items()}, path)


def assert_matches_peft(adapter_dir: Path, base: PreTrainedModel, spec: BaseModelSpec, cfg: LoRAConfig) -> None:
    ours = load_peft_adapter("x", str(adapter_dir), spec, cfg)
    ref = peft_lora_weights(adapter_dir, base)
    assert set(ours.weights) == set(ref)
    for key, (a, b, scaling) in ref.items():
        A, B = ours.weights[key]
        assert A.dtype == B.dtype == torch.float32
        torch.testing.assert_close(A, a, rtol=0, atol=0)
        torch.testing.assert_close(B * ours.scale, b * scaling, rtol=1e-6, atol=1e-7)
    assert ours.nbytes == sum(a.nbytes + b.nbytes for a, b in ours.weights.values())


@pytest.mark.parametrize("name", ["qkv_r4", "all_r8_rs", "mlp_r2", "o_r3"])
def test_weights_and_scale_match_peft(name: str, adapter_store: dict[str, Path], tiny_model: PreTrainedModel,
                                      base_spec: BaseModelSpec) -> None:
    assert_matches_peft(adapter_store[name], tiny_model, base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))


@pytest.mark.parametrize(("rslora", "expected"), [(False, 16.0 / 8), (True, 16.0 / 8 ** 0.5)])
def test_scale_with_and_without_rslora(rslora: bool, expected: float, tmp_path: Path, tiny_model: PreTrainedModel,
                                       base_spec: BaseModelSpec) -> None:
    path = make_peft_adapter(tiny_model, tmp_path / "a", 8, 16.0, ["q_proj"], use_rslora=rslora)
    w = load_peft_adapter("a", str(path), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))
    assert (w.rank, w.alpha, w.use_rslora) == (8, 16.0, rslora)
    assert w.scale == pytest.approx(expected)
    assert w.target_modules == {"q_proj"}


def test_all_linear_targets(adapter_store: dict[str, Path], base_spec: BaseModelSpec, copy_adapter: Any) -> None:
    w = load_peft_adapter("a", str(adapter_store["all_r8_rs"]), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))
    assert w.target_modules == ALL and len(w.weights) == 7 * base_spec.num_layers
    path = copy_adapter("all_r8_rs")  # PEFT expands "all-linear" on save; the literal form loads too
    edit_adapter_config(path, target_modules="all-linear")
    assert load_peft_adapter("a", str(path), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS)).target_modules == ALL


def test_regex_target_modules(tmp_path: Path, tiny_model: PreTrainedModel, base_spec: BaseModelSpec) -> None:
    path = make_peft_adapter(tiny_model, tmp_path / "rx", 4, 8.0, r".*\.(q_proj|v_proj)")
    w = load_peft_adapter("rx", str(path), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))
    assert w.target_modules == {"q_proj", "v_proj"}
    assert_matches_peft(path, tiny_model, base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))


def test_rank_and_alpha_patterns_fold_into_b(tmp_path: Path, tiny_model: PreTrainedModel,
                                             base_spec: BaseModelSpec) -> None:
    path = make_peft_adapter(tiny_model, tmp_path / "pat", 4, 8.0, "all-linear", rank_pattern={"q_proj": 2},
                             alpha_pattern={"down_proj": 3.0, r"layers\.1\.self_attn\.o_proj": 1.0})
    w = load_peft_adapter("pat", str(path), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))
    assert w.weights[(0, "q_proj")][0].shape[0] == 2 and w.rank == 4
    assert_matches_peft(path, tiny_model, base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))


@pytest.mark.parametrize("rename", [
    lambda k: k.replace("base_model.model.model.", "model."),
    lambda k: k.replace(".weight", ".default.weight"),
    lambda k: k.replace("base_model.model.model.", "base_model.model.").replace(".weight", ".my-ad.weight"),
], ids=["model-prefix", "adapter-name-segment", "short-prefix-named"])
def test_key_variants(rename: Any, copy_adapter: Any, adapter_store: dict[str, Path],
                      base_spec: BaseModelSpec) -> None:
    path = copy_adapter("qkv_r4")
    rewrite_keys(path, rename)
    ours = load_peft_adapter("a", str(path), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))
    ref = load_peft_adapter("a", str(adapter_store["qkv_r4"]), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))
    assert ours.weights.keys() == ref.weights.keys()
    assert all(torch.equal(ours.weights[k][1], ref.weights[k][1]) for k in ref.weights)


def test_llama_base(tmp_path: Path) -> None:
    llama = make_tiny_model("llama", seed=5)
    spec = BaseModelSpec.from_hf_config(llama.config, "tiny-llama")
    assert spec.architecture == "LlamaForCausalLM"
    path = make_peft_adapter(llama, tmp_path / "l", 4, 4.0, ["q_proj", "down_proj"])
    assert_matches_peft(path, llama, spec, LoRAConfig(adapter_roots=TMP_ROOTS))


def test_spec_matches_model_linears(tiny_model: PreTrainedModel, base_spec: BaseModelSpec) -> None:
    for name, module in tiny_model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            assert base_spec.module_shapes[name.rsplit(".", 1)[-1]] == (module.in_features, module.out_features)
    assert base_spec.num_layers == 2


def test_base_model_name_mismatch_only_warns(copy_adapter: Any, base_spec: BaseModelSpec,
                                             caplog: pytest.LogCaptureFixture) -> None:
    path = copy_adapter("qkv_r4")
    edit_adapter_config(path, base_model_name_or_path="someorg/other-model")
    with caplog.at_level(logging.WARNING, logger="loraplex.lora.peft"):
        load_peft_adapter("a", str(path), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))
    assert "someorg/other-model" in caplog.text and "tiny-qwen3" in caplog.text
    caplog.clear()
    edit_adapter_config(path, base_model_name_or_path="/models/TINY-QWEN3/")
    with caplog.at_level(logging.WARNING, logger="loraplex.lora.peft"):
        load_peft_adapter("a", str(path), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))
    assert "trained on" not in caplog.text


def test_pickle_weights_when_allowed(copy_adapter: Any, adapter_store: dict[str, Path],
                                     base_spec: BaseModelSpec) -> None:
    path = copy_adapter("mlp_r2")
    torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
    os.remove(path / "adapter_model.safetensors")
    ours = load_peft_adapter("a", str(path), base_spec, LoRAConfig(allow_pickle=True, adapter_roots=TMP_ROOTS))
    ref = load_peft_adapter("a", str(adapter_store["mlp_r2"]), base_spec, LoRAConfig(adapter_roots=TMP_ROOTS))
    assert all(torch.equal(ours.weights[k][0], ref.weights[k][0]) for k in ref.weights)


def test_hub_id_downloads_snapshot(monkeypatch: pytest.MonkeyPatch, adapter_store: dict[str, Path],
                                   base_spec: BaseModelSpec) -> None:
    calls = []

    def fake_download(repo_id: str, revision: str | None = None, allow_patterns: Any = None) -> str:
        calls.append((repo_id, revision, allow_patterns))
        return str(adapter_store["o_r3"])
    monkeypatch.setattr(peft_source, "snapshot_download", fake_download)
    cfg = LoRAConfig(adapter_roots=["/nonexistent-root"], allow_hub_adapters=True)  # roots confine local paths
    w = load_peft_adapter("hub", "someorg/some-adapter", base_spec, cfg, revision="v1")
    assert w.target_modules == {"o_proj"}
    assert calls == [("someorg/some-adapter", "v1", ["adapter_config.json", "adapter_model.safetensors"])]


def test_hub_network_failure_is_clear(base_spec: BaseModelSpec) -> None:
    from loraplex.errors import AdapterLoadError  # conftest's _no_hub makes every download fail

    with pytest.raises(AdapterLoadError, match="could not download 'someorg/x' from the Hugging Face hub"):
        load_peft_adapter("hub", "someorg/x", base_spec, LoRAConfig(allow_hub_adapters=True))


def test_existing_local_dir_wins_over_hub_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             copy_adapter: Any) -> None:
    copy_adapter("qkv_r4", tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert resolve_adapter_source("a", "org/name", None, LoRAConfig(adapter_roots=[str(tmp_path)],
                                                                    allow_hub_adapters=True)) == (tmp_path / "org" / "name").resolve()
