"""Builds what the engine is made of: device, model, tokenizer, KV capacity, adapter registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.backend.models.llama import DecoderModel
from loraplex.backend.models.loader import load_model, resolve_model_path
from loraplex.config import EngineConfig
from loraplex.errors import ConfigError
from loraplex.lora.peft import BaseModelSpec
from loraplex.lora.registry import AdapterRegistry
from loraplex.lora.slots import LoRASlots, LoRATarget

log = logging.getLogger(__name__)

CPU_KV_BYTES = 256 * 2**20  # KV cache size on CPU unless configured

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineParts:
    model: DecoderModel
    model_name: str
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    num_blocks: int
    eos_ids: set[int]
    adapters: Any  # lora.registry.AdapterRegistry | None
    architecture: str
    runner: Any = None  # set when the model runs elsewhere (tensor parallelism's executor)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def build_engine_parts(config: EngineConfig) -> EngineParts:
    if config.tensor_parallel_size > 1:
        from loraplex.backend.distributed.executor import build_tp_engine_parts

        return build_tp_engine_parts(config)
    mc = config.model
    device = resolve_device(mc.device)
    dtype = resolve_dtype(mc.dtype, device)
    torch.manual_seed(mc.seed)
    demo = mc.model is None
    if demo:
        from loraplex.backend.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME

        path, model_name = Path(DEMO_MODEL_DIR), DEMO_MODEL_NAME
    else:
        assert mc.model is not None
        path, model_name = resolve_model_path(mc.model, mc.revision), mc.model
    loaded = load_model(path, dtype, device)
    tokenizer = load_tokenizer(Path(mc.tokenizer) if mc.tokenizer else path)
    spec = loaded.model.spec
    max_model_len = mc.max_model_len or spec.max_positions
    if max_model_len > spec.max_positions:
        raise ConfigError(f"max_model_len={max_model_len}: must be <= the model's max_position_embeddings="
                          f"{spec.max_positions}")
    adapters = build_registry(config, loaded, model_name, dtype, device) if config.lora.enable_lora else None
    num_blocks = kv_capacity(config, loaded.model, dtype, device, max_model_len)
    capacity = num_blocks * config.cache.block_size
    if capacity < max_model_len:  # a request longer than the whole cache could never run
        log.warning("max_model_len lowered from %d to the KV cache capacity of %d tokens", max_model_len, capacity)
        max_model_len = capacity
    if demo and adapters is not None:
        register_demo_adapters(adapters)
    if adapters is not None:
        preload_adapters(adapters, config.lora.preload)
    return EngineParts(loaded.model, model_name, tokenizer, device, dtype, max_model_len, num_blocks,
                       eos_token_ids(path, tokenizer), adapters, loaded.architecture)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(path: Path, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = path / "generation_config.json"
    if gen.exists():
        import json

        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([value] if isinstance(value, int) else (value or []))
    return ids


def kv_capacity(config: EngineConfig, model: DecoderModel, dtype: torch.dtype, device: torch.device,
                max_model_len: int) -> int:
    """Number of KV blocks: the override, else from the CPU byte budget or free GPU memory."""
    from loraplex.backend.engine.runner import ModelRunner

    cc = config.cache
    per_block = ModelRunner.bytes_per_block(model, cc.block_size, dtype)
    if cc.num_gpu_blocks_override is not None:
        num = cc.num_gpu_blocks_override
    elif cc.kv_cache_memory_bytes is not None:
        num = cc.kv_cache_memory_bytes // per_block
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserve = total * (1 - cc.gpu_memory_utilization) + activation_reserve(config, model)
        num = int((free - reserve) // per_block)
    else:
        num = CPU_KV_BYTES // per_block
    if num * cc.block_size < config.cache.block_size or num < 1:
        raise ConfigError(f"KV cache too small: {num} blocks of {cc.block_size} tokens; raise "
                          "gpu_memory_utilization / kv_cache_memory_bytes or num_gpu_blocks_override")
    return num


def capture_tokens(config: EngineConfig) -> int:
    """The largest prefill/mixed step captured in a CUDA graph (0: none)."""
    if config.model.enforce_eager:
        return 0
    return min(config.model.max_capture_tokens, config.scheduler.max_num_batched_tokens)


def activation_reserve(config: EngineConfig, model: DecoderModel) -> float:
    """Bytes kept free for activations of the largest step and the step graphs' memory pool (a
    generous estimate)."""
    spec = model.spec
    tokens = config.scheduler.max_num_batched_tokens + capture_tokens(config)
    per_token = 4 * (spec.hidden_size * 8 + spec.intermediate_size * 4)
    logits = config.scheduler.max_num_seqs * spec.vocab_size * 4 * 4
    return float(tokens * per_token + logits + 2**30)


def build_registry(config: EngineConfig, loaded: Any, model_name: str, dtype: torch.dtype,
                   device: torch.device) -> Any:
    model: DecoderModel = loaded.model
    shapes = model.spec.module_shapes()
    linears = model.lora_linears()
    targets = [LoRATarget(layer, group, modules, shapes[modules[0]][0], tuple(shapes[m][1] for m in modules))
               for layer, group, modules, _ in linears]
    slots = LoRASlots(targets, config.lora.max_loras, config.lora.max_lora_rank, dtype, device)
    for (*_, linear), target in zip(linears, targets, strict=True):
        lora_a, lora_b = slots.buffers(target.layer, target.group)
        linear.set_lora(lora_a, lora_b, slots.scales)
    base = BaseModelSpec(architecture=loaded.architecture, model_name=model_name,
                         num_layers=model.spec.num_layers, module_shapes=shapes)
    from loraplex.backend.demo import DEMO_ADAPTERS

    demo_root = str(next(iter(DEMO_ADAPTERS.values())).parent)  # built-in adapters count as a root
    return AdapterRegistry(config.lora, base, slots, builtin_roots=(demo_root,))


def register_demo_adapters(adapters: Any) -> None:
    from loraplex.backend.demo import DEMO_ADAPTERS

    for name, path in DEMO_ADAPTERS.items():
        adapters.register(name, str(path), pinned=True, trusted=True)


def preload_adapters(adapters: Any, preload: list[str]) -> None:
    for item in preload:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ConfigError(f"preload={item!r}: expected NAME=SOURCE")
        adapters.register(name, source, trusted=True)  # the operator's own flag: not confined
