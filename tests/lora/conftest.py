"""Shared fixtures for the lora tests: one tiny Qwen3 model and a few real PEFT adapters on disk."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedModel

from loraplex.lora import peft_source
from loraplex.lora.peft import BaseModelSpec
from tests.lora_factory import make_peft_adapter, make_tiny_model

# name -> (r, alpha, target_modules, use_rslora, seed)
ADAPTERS: dict[str, tuple[int, float, Any, bool, int]] = {
    "qkv_r4": (4, 8.0, ["q_proj", "k_proj", "v_proj"], False, 1),
    "all_r8_rs": (8, 16.0, "all-linear", True, 2),
    "mlp_r2": (2, 4.0, ["gate_proj", "up_proj", "down_proj"], False, 3),
    "o_r3": (3, 6.0, ["o_proj"], False, 4),
}


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing downloads: a hub id fails like a machine without network, unless a test patches it."""

    def offline(repo_id: str, **kwargs: Any) -> str:
        raise ConnectionError(f"no network (test) for {repo_id}")
    monkeypatch.setattr(peft_source, "snapshot_download", offline)


@pytest.fixture(scope="session")
def tiny_model() -> PreTrainedModel:
    return make_tiny_model("qwen3", seed=0)


@pytest.fixture(scope="session")
def base_spec(tiny_model: PreTrainedModel) -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(tiny_model.config, "tiny-qwen3")


@pytest.fixture(scope="session")
def adapter_store(tmp_path_factory: pytest.TempPathFactory, tiny_model: PreTrainedModel) -> dict[str, Path]:
    """The ADAPTERS, written once per session; treat as read-only (copy before mutating)."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_peft_adapter(tiny_model, root / name, r, alpha, targets, use_rslora=rs, seed=seed)
            for name, (r, alpha, targets, rs, seed) in ADAPTERS.items()}


@pytest.fixture
def copy_adapter(adapter_store: dict[str, Path], tmp_path: Path) -> Callable[..., Path]:
    """``copy_adapter(name, dest=None)``: a private, mutable copy of a stored adapter."""

    def copy(name: str, dest: Path | None = None) -> Path:
        return Path(shutil.copytree(adapter_store[name], dest or tmp_path / name))
    return copy
