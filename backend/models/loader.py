"""Reads an HF model (config.json + safetensors, one file or a sharded index) from a
local directory or a hub id into loraplex's own model implementation."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open

from loraplex.backend.layers.lora import LoRALinear
from loraplex.backend.models.llama import FUSED, ArchSpec, DecoderModel
from loraplex.errors import ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)

# architecture -> (qk_norm, q/k/v bias when the config does not say)
ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (False, True),
    "Qwen3ForCausalLM": (True, False),
}


@dataclass
class LoadedModel:
    model: DecoderModel
    hf_config: Any
    architecture: str
    path: Path


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local directory as is; anything else is fetched from the hub (when the network allows)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or model.startswith("."):
        raise ConfigError(f"model={model!r}: directory does not exist")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(model, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # network, auth or missing repo
        raise ConfigError(f"model={model!r}: not a local directory and the hub download failed: {exc}") from exc
    return Path(local)


def load_hf_config(path: Path) -> tuple[Any, str]:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    archs = getattr(hf_config, "architectures", None) or []
    arch = archs[0] if archs else ""
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch or '(none)'!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    return hf_config, arch


def load_model(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    hf_config, arch = load_hf_config(path)
    qk_norm, bias_default = ARCHITECTURES[arch]
    spec = ArchSpec.from_hf(hf_config, qk_norm=qk_norm, qkv_bias_default=bias_default)
    model = DecoderModel(spec, hf_config)
    rope_cos, rope_sin = model.rope.cos, model.rope.sin
    model = model.to(dtype=dtype, device=device)
    model.rope.cos, model.rope.sin = rope_cos.to(device), rope_sin.to(device)  # rope stays float32
    load_weights(model, path)
    model.eval().requires_grad_(False)
    return LoadedModel(model, hf_config, arch, path)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model={str(path)!r}: no safetensors weights found")
    return files


def load_weights(model: DecoderModel, path: Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for file in _weight_files(path):
        with safe_open(os.fspath(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                target = _copy_tensor(model, params, name, f.get_tensor(name))
                if target:
                    loaded.add(target)
    if model.spec.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ConfigError(f"model={str(path)!r}: weights missing from the checkpoint: {missing[:8]}")


def _copy_tensor(model: DecoderModel, params: dict[str, torch.nn.Parameter], name: str,
                 tensor: torch.Tensor) -> str | None:
    """Copies one checkpoint tensor into its (possibly fused) parameter; returns the parameter's name."""
    if "rotary_emb" in name:
        return None
    key = name[len("model."):] if name.startswith("model.") else name
    if key == "lm_head.weight" and model.spec.tie_word_embeddings:
        return None
    parts = key.split(".")
    if parts[0] == "layers" and len(parts) >= 5:
        module, leaf = ".".join(parts[2:-1]), parts[-1]
        if module in FUSED:
            fused_name, index = FUSED[module]
            target = f"layers.{parts[1]}.{fused_name}.{leaf}"
            layer = cast(LoRALinear, model.get_submodule(f"layers.{parts[1]}.{fused_name}"))
            start = sum(layer.out_slices[:index])
            params[target].data[start:start + layer.out_slices[index]].copy_(tensor)
            return target if index == len(layer.out_slices) - 1 else f"{target}#{index}"
    if key not in params:
        log.warning("ignoring checkpoint tensor %s", name)
        return None
    if params[key].shape != tensor.shape:
        raise ConfigError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                          f"expected {tuple(params[key].shape)}")
    params[key].data.copy_(tensor)
    return key
