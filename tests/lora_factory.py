"""Tiny random HF models and real PEFT LoRA adapters written to disk, for tests (nothing downloads).

- ``tiny_config(arch)``: a 2-layer Qwen3 or Llama config (hidden 64, 4 heads, 2 KV heads).
- ``make_tiny_model(arch, out_dir=None)``: random weights from that config, saved if asked.
- ``make_peft_adapter(base, out_dir, r, alpha, targets)``: ``peft.get_peft_model(...).save_pretrained``
  with random A and B (``init_lora_weights=False``), so the adapter changes the output.
- ``clone_peft_adapter(dir, out_dir, seed)``: a copy of a saved adapter with fresh random A and B
  (same keys, shapes and config): many distinct real adapters without a PEFT model each.
- ``edit_adapter_config(dir, **changes)``: rewrite fields of a saved ``adapter_config.json``.
- ``peft_lora_weights(dir, base)``: PEFT's own view of the saved adapter (A, B, scaling per module).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel, Qwen3Config

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256)


def tiny_config(arch: str = "qwen3", **overrides: Any) -> PretrainedConfig:
    """A tiny ``Qwen3ForCausalLM`` ("qwen3") or ``LlamaForCausalLM`` ("llama") config."""
    cls, name = {"qwen3": (Qwen3Config, "Qwen3ForCausalLM"), "llama": (LlamaConfig, "LlamaForCausalLM")}[arch]
    return cls(**{**TINY, "architectures": [name], **overrides})


def make_tiny_model(arch: str = "qwen3", out_dir: str | Path | None = None, seed: int = 0,
                    **overrides: Any) -> PreTrainedModel:
    """A float32 model with random weights; saved with ``save_pretrained`` when ``out_dir`` is given."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def make_peft_adapter(base_dir_or_model: str | Path | PreTrainedModel, out_dir: str | Path, r: int,
                      alpha: float, targets: list[str] | str, use_rslora: bool = False, seed: int = 0,
                      **lora_kwargs: Any) -> Path:
    """Writes a real PEFT LoRA adapter with random A/B for the base model; returns ``out_dir``.

    ``targets`` is PEFT's ``target_modules`` (names, a regex or "all-linear"); ``lora_kwargs`` go to
    ``LoraConfig`` (``rank_pattern``, ``alpha_pattern``, ``use_dora``...). The base model passed in is
    not modified (a copy gets the LoRA layers).
    """
    model: Any
    if isinstance(base_dir_or_model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(base_dir_or_model, dtype=torch.float32)
    else:
        model = copy.deepcopy(base_dir_or_model)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,  # type: ignore[arg-type]
                        init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out


def clone_peft_adapter(adapter_dir: str | Path, out_dir: str | Path, seed: int) -> Path:
    """Writes a copy of the PEFT adapter at ``adapter_dir`` whose every tensor is redrawn (normal, the
    original tensor's standard deviation); returns ``out_dir``. PEFT loads it like the original."""
    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "adapter_config.json", out / "adapter_config.json")
    g = torch.Generator().manual_seed(seed)
    tensors = {key: (torch.randn(t.shape, generator=g) * t.float().std()).to(t.dtype)
               for key, t in sorted(load_file(str(src / "adapter_model.safetensors")).items())}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def edit_adapter_config(adapter_dir: str | Path, **changes: Any) -> dict[str, Any]:
    """Rewrites fields of ``adapter_dir/adapter_config.json``; returns the new config."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))
    return config


def peft_lora_weights(adapter_dir: str | Path, base: PreTrainedModel
                      ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """PEFT's loaded adapter: ``(layer, module) -> (A [r, in], B [out, r], scaling)``."""
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            out[(layer, parts[-1])] = (module.lora_A["default"].weight.detach().clone(),
                                       module.lora_B["default"].weight.detach().clone(),
                                       float(module.scaling["default"]))
    return out


# adapter roots covering the temp dir the tests write adapters to (no root allows no local path)
TMP_ROOTS = [tempfile.gettempdir()]
