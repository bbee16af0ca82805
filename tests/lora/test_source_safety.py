"""Safe defaults of adapter sources (issue 11): roots, hub opt-in, content-checked weights,
overflowing values, the proto's name rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loraplex.config import LoRAConfig
from loraplex.errors import AdapterLoadError, AdapterSourceForbiddenError
from loraplex.lora import peft as peft_module
from loraplex.lora.peft import BaseModelSpec, load_peft_adapter
from loraplex.lora.registry import AdapterRegistry
from loraplex.lora.slots import LoRASlots, targets_from_spec
from tests.lora_factory import edit_adapter_config


def test_no_roots_allows_no_local_path_and_hides_what_exists(copy_adapter: Any, base_spec: BaseModelSpec,
                                                            tmp_path: Path) -> None:
    real = copy_adapter("qkv_r4")
    messages = []
    for source in (str(real), str(tmp_path / "missing"), "/proc/self/root" + str(real), f"{real}/../{real.name}"):
        with pytest.raises(AdapterSourceForbiddenError) as err:
            load_peft_adapter("x", source, base_spec, LoRAConfig())
        messages.append(err.value.reason.replace(source, "<source>"))
    assert len(set(messages)) == 1, messages  # existing and missing paths get the very same answer
    inside = LoRAConfig(adapter_roots=[str(tmp_path)])
    with pytest.raises(AdapterSourceForbiddenError) as missing:
        load_peft_adapter("x", str(tmp_path / "missing"), base_spec, inside)
    assert missing.value.reason.replace(str(tmp_path / "missing"), "<source>") == messages[0]
    assert load_peft_adapter("x", str(real), base_spec, inside).rank == 4


def test_hub_sources_only_when_allowed(monkeypatch: pytest.MonkeyPatch, adapter_store: dict[str, Path],
                                       base_spec: BaseModelSpec) -> None:
    calls: list[str] = []
    monkeypatch.setattr("loraplex.lora.peft_source.snapshot_download",
                        lambda repo_id, **kw: calls.append(repo_id) or str(adapter_store["o_r3"]))
    with pytest.raises(AdapterSourceForbiddenError, match="hub adapters are off"):
        load_peft_adapter("h", "someorg/adapter", base_spec, LoRAConfig())
    with pytest.raises(AdapterSourceForbiddenError, match="'evil' is not in the allowed list"):
        load_peft_adapter("h", "evil/adapter", base_spec, LoRAConfig(allow_hub_adapters=True,
                                                                      hub_adapter_orgs=["someorg"]))
    assert calls == []  # nothing downloaded before the checks
    cfg = LoRAConfig(allow_hub_adapters=True, hub_adapter_orgs=["someorg"])
    assert load_peft_adapter("h", "someorg/adapter", base_spec, cfg).target_modules == {"o_proj"}
    assert calls == ["someorg/adapter"]


def test_pickle_behind_a_safetensors_name_is_refused_unread(copy_adapter: Any, base_spec: BaseModelSpec,
                                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = copy_adapter("qkv_r4")
    st = path / "adapter_model.safetensors"
    torch.save(load_file(st), path / "w.bin")
    st.unlink()
    st.symlink_to("w.bin")
    loads: list[Any] = []
    monkeypatch.setattr(peft_module.torch, "load", lambda *a, **k: loads.append(a) or {})
    with pytest.raises(AdapterLoadError, match="not a safetensors file"):
        load_peft_adapter("p", str(path), base_spec, LoRAConfig(adapter_roots=[str(tmp_path)]))
    assert loads == []  # torch.load never reached with pickle off


@pytest.mark.parametrize("alpha", [1e38, 3e38])
def test_values_that_overflow_the_serving_dtype_are_refused(alpha: float, copy_adapter: Any,
                                                            base_spec: BaseModelSpec, tmp_path: Path) -> None:
    path = copy_adapter("qkv_r4")
    edit_adapter_config(path, lora_alpha=alpha)
    reg = registry(base_spec, tmp_path)
    with pytest.raises(AdapterLoadError, match="overflow"):
        reg.register("big", str(path))
    assert reg.list() == []


def test_huge_weights_are_refused(copy_adapter: Any, base_spec: BaseModelSpec, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = copy_adapter("qkv_r4")
    tensors = {k: v * 1e30 for k, v in load_file(path / "adapter_model.safetensors").items()}
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="overflow"):
        registry(base_spec, tmp_path).register("huge", str(path))


def registry(base_spec: BaseModelSpec, root: Path) -> AdapterRegistry:
    slots = LoRASlots(targets_from_spec(2, base_spec.module_shapes), max_loras=2, max_rank=8)
    return AdapterRegistry(LoRAConfig(adapter_roots=[str(root)]), base_spec, slots)


@pytest.mark.parametrize("name", ["..", "x/../y", "a" * 129, "a b", "a//b", "./a", "", "tiny-qwen3", "TINY-QWEN3"])
def test_names_follow_the_proto_rule_and_differ_from_the_base(name: str, adapter_store: dict[str, Path],
                                                              base_spec: BaseModelSpec, tmp_path: Path) -> None:
    reg = registry(base_spec, adapter_store["qkv_r4"].parent)
    with pytest.raises(AdapterLoadError):
        reg.register(name, str(adapter_store["qkv_r4"]))
    assert reg.register("org/name-1.v2_x", str(adapter_store["qkv_r4"])).version == 1
    assert json.dumps([a.name for a in reg.list()]) == '["org/name-1.v2_x"]'
