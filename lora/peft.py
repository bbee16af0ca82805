"""Load and validate PEFT LoRA adapters (``adapter_config.json`` + weights) for one base model.

Everything is checked before a tensor is read: the source (confined local path or hub id),
the config (only plain LoRA on the attention/MLP projections of the decoder layers), the
weights file (safetensors unless ``allow_pickle``; size cap) and every key's name and shape
against the base model. Refusals raise ``AdapterLoadError`` (or ``AdapterSourceForbiddenError``
for confinement) with a reason that names the problem.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loraplex.config import LoRAConfig
from loraplex.errors import AdapterLoadError
from loraplex.lora.peft_keys import (
    EMBEDDING_NAMES,
    LORA_MODULES,
    MODULE_PARENT,
    Meta,
    WeightPlan,
    plan_weights,
)
from loraplex.lora.peft_source import Resolved, fingerprint, resolve

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")
MAX_CONFIG_BYTES = 1 << 20
# config keys whose truthy value means a feature this server does not implement
UNSUPPORTED_FEATURES: dict[str, str] = {
    "use_dora": "DoRA (use_dora) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "lora_bias": "LoRA bias (lora_bias) is not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "trainable_token_indices": "trainable_token_indices (embedding updates) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
}


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit; the engine builds it from the loaded model."""

    architecture: str  # e.g. "Qwen3ForCausalLM"
    model_name: str  # base model name/path as known to the server
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]  # "q_proj" -> (in_features, out_features)

    @classmethod
    def from_hf_config(cls, config: Any, model_name: str) -> BaseModelSpec:
        """Spec of a Llama/Qwen-style HF config (``hidden_size``, heads, ``head_dim``)."""
        hidden, inter = config.hidden_size, config.intermediate_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        q, kv = heads * head_dim, kv_heads * head_dim
        shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
                  "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        return cls(arch, model_name, config.num_hidden_layers, shapes)


@dataclass
class LoRAWeights:
    """A validated adapter in host memory.

    ``weights[(layer, module)] = (A [r, in], B [out, r])`` float32 CPU, so that the update is
    ``y += scale * x @ A.T @ B.T``. Per-module ``alpha_pattern``/``rank_pattern`` scales are
    folded into B, so ``scale`` (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA) is per adapter.
    """

    name: str
    source: str
    rank: int  # largest rank over modules
    alpha: float
    use_rslora: bool
    scale: float
    target_modules: frozenset[str]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    nbytes: int
    fingerprint: str = ""  # identity of the files it came from (path, size, mtime); see peft_source


def resolve_adapter_source(name: str, source: str, revision: str | None, cfg: LoRAConfig) -> Path:
    """Local directory (confined to ``cfg.adapter_roots``) or a hub snapshot directory."""
    return resolve(name, source, revision, cfg).path


def load_peft_adapter(name: str, source: str, base: BaseModelSpec, cfg: LoRAConfig,
                      revision: str | None = None) -> LoRAWeights:
    """Resolves, validates and reads one PEFT LoRA adapter; raises ``AdapterLoadError`` on refusal."""
    where = resolve(name, source, revision, cfg)
    config = read_adapter_config(name, where)
    check_config(name, config, base, cfg)
    weights_path = find_weights_file(name, where, cfg)
    meta, fetch = open_weights(name, weights_path, cfg.allow_pickle)
    plan = plan_weights(name, meta, config, base, cfg.max_lora_rank)
    check_targets(name, config, plan, base)
    tensors = read_tensors(name, plan, fetch)
    warn_base_mismatch(name, config, base)
    return build_weights(name, source, config, plan, tensors,
                         fingerprint(where.path / "adapter_config.json", weights_path))


def read_adapter_config(name: str, where: Resolved) -> dict[str, Any]:
    """Parsed ``adapter_config.json``; refuses missing, oversized or invalid JSON."""
    path = where.file("adapter_config.json")
    if not path.is_file():
        raise AdapterLoadError(name, "adapter_config.json is missing (not a PEFT adapter directory?)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterLoadError(name, f"adapter_config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterLoadError(name, f"adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(name, "adapter_config.json must hold a JSON object")
    return config


def check_config(name: str, config: dict[str, Any], base: BaseModelSpec, cfg: LoRAConfig) -> None:
    """Refuses non-LoRA types, unsupported features, bad ranks/alphas and bad target modules."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterLoadError(name, f"peft_type is {peft_type!r}; only LORA adapters are supported")
    for key, reason in UNSUPPORTED_FEATURES.items():
        if config.get(key):
            raise AdapterLoadError(name, reason)
    if config.get("bias", "none") != "none":
        raise AdapterLoadError(name, f"bias={config.get('bias')!r} is not supported; only bias='none'")
    ranks = [("r", config.get("r"))] + [(f"rank_pattern[{k!r}]", v) for k, v in _pattern(name, config, "rank_pattern")]
    for label, r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterLoadError(name, f"{label}={r!r} must be a positive integer")
        if r > cfg.max_lora_rank:
            raise AdapterLoadError(name, f"rank {label}={r} is above max_lora_rank={cfg.max_lora_rank}")
    alphas = [("lora_alpha", config.get("lora_alpha", 8))] + _pattern(name, config, "alpha_pattern")
    for label, a in alphas:
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a):
            raise AdapterLoadError(name, f"{label}={a!r} must be a finite number")
    config_targets(name, config, base)


def _pattern(name: str, config: dict[str, Any], key: str) -> list[tuple[str, Any]]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterLoadError(name, f"{key} must be a JSON object")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as e:
            raise AdapterLoadError(name, f"{key} key {pattern!r} is not a valid regex: {e}") from None
    return list(value.items())


def candidate_module_names(base: BaseModelSpec) -> list[str]:
    """Full module names of the base model that a target regex is matched against."""
    names = [f"model.layers.{i}.{MODULE_PARENT[m]}.{m}" for i in range(base.num_layers) for m in LORA_MODULES]
    return names + ["model.embed_tokens", "lm_head"]


def config_targets(name: str, config: dict[str, Any], base: BaseModelSpec) -> frozenset[str]:
    """Module names ``target_modules`` selects (list of names, a regex, or "all-linear")."""
    targets = config.get("target_modules")
    if targets == "all-linear":
        return frozenset(LORA_MODULES)
    if isinstance(targets, str):
        try:
            hits = [n for n in candidate_module_names(base) if re.fullmatch(targets, n)]
        except re.error as e:
            raise AdapterLoadError(name, f"target_modules regex {targets!r} is invalid: {e}") from None
        return _target_names(name, [h.rsplit(".", 1)[-1] for h in hits], f"regex {targets!r}")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        return _target_names(name, [t.rsplit(".", 1)[-1] for t in targets], "target_modules")
    raise AdapterLoadError(name, f"target_modules={targets!r}: expected a list of module names, a regex "
                                 "or 'all-linear'")


def _target_names(name: str, modules: list[str], what: str) -> frozenset[str]:
    embeddings = sorted(set(modules) & EMBEDDING_NAMES)
    if embeddings:
        raise AdapterLoadError(name, f"{what} targets {embeddings}: LoRA on embeddings / lm_head is not supported")
    unknown = sorted(set(modules) - set(LORA_MODULES))
    if unknown:
        raise AdapterLoadError(name, f"{what} names modules {unknown} that the base model does not have: the "
                                     f"adapter was made for another architecture (supported: {list(LORA_MODULES)})")
    if not modules:
        raise AdapterLoadError(name, f"{what} matches no module of the base model: the adapter was made for "
                                     "another architecture")
    return frozenset(modules)


def check_targets(name: str, config: dict[str, Any], plan: WeightPlan, base: BaseModelSpec) -> None:
    """Every module with weights must be one that ``target_modules`` selects."""
    allowed = config_targets(name, config, base)
    extra = sorted({module for _layer, module in plan.modules} - allowed)
    if extra:
        raise AdapterLoadError(name, f"weights for {extra} are not in target_modules {sorted(allowed)}")


def find_weights_file(name: str, where: Resolved, cfg: LoRAConfig) -> Path:
    """The weights file to read: safetensors, or pickle when allowed; size-capped."""
    path = where.file(SAFETENSORS_FILE)
    if not path.is_file():
        pickles = [p for p in (where.file(f) for f in PICKLE_FILES) if p.is_file()]
        if not pickles:
            raise AdapterLoadError(name, f"weights file {SAFETENSORS_FILE} is missing")
        if not cfg.allow_pickle:
            raise AdapterLoadError(name, f"pickle weights ({pickles[0].name}) are refused: convert them to "
                                         f"{SAFETENSORS_FILE} or start the server with allow_pickle")
        path = pickles[0]
    size = path.stat().st_size
    if size > cfg.max_adapter_bytes:
        raise AdapterLoadError(name, f"weights file {path.name} is {size} bytes, above max_adapter_bytes="
                                     f"{cfg.max_adapter_bytes}")
    return path


Fetch = Callable[[str], torch.Tensor]


def open_weights(name: str, path: Path, allow_pickle: bool = False) -> tuple[Meta, Fetch]:
    """``(key -> (shape, dtype code), reader of one tensor)`` of a weights file; reads no tensor data
    for safetensors (the header only). What the file is comes from its content, never its name:
    anything without a safetensors header is refused unless ``allow_pickle``."""
    if is_safetensors(path):
        return _open_safetensors(name, path)
    if not allow_pickle:
        raise AdapterLoadError(name, f"weights file {path.name} is not a safetensors file and pickle weights are "
                                     f"refused: convert it to {SAFETENSORS_FILE} or start the server with "
                                     "allow_pickle")
    return _open_pickle(name, path)


def is_safetensors(path: Path) -> bool:
    """True when the file starts with a safetensors header: an 8-byte little-endian length, then a
    JSON object of that many bytes that fits in the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + length <= size


def _corrupt(name: str, path: Path, e: Exception) -> AdapterLoadError:
    return AdapterLoadError(name, f"weights file {path.name} is corrupt or truncated: {e}")


def _open_safetensors(name: str, path: Path) -> tuple[Meta, Fetch]:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        meta = {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype())
                for k in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors raises its own error types
        raise _corrupt(name, path, e) from None

    def fetch(key: str) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise _corrupt(name, path, e) from None
    return meta, fetch


def _open_pickle(name: str, path: Path) -> tuple[Meta, Fetch]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused (not plain tensors) or broken file
        raise AdapterLoadError(name, f"{path.name} could not be read with torch.load(weights_only=True): "
                                     f"{str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterLoadError(name, f"{path.name} does not hold a dict of tensors")
    meta = {str(k): (tuple(v.shape), _dtype_code(v.dtype)) for k, v in state.items()}
    return meta, state.__getitem__


def _dtype_code(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}.get(
        dtype, str(dtype))


def read_tensors(name: str, plan: WeightPlan, fetch: Callable[[str], torch.Tensor]
                 ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Reads the planned A/B pairs as float32 CPU tensors; refuses NaN/Inf."""
    out = {}
    for (layer, module), (key_a, key_b) in plan.modules.items():
        a, b = (fetch(k).to(device="cpu", dtype=torch.float32).contiguous() for k in (key_a, key_b))
        for key, t in ((key_a, a), (key_b, b)):
            if not bool(torch.isfinite(t).all()):
                raise AdapterLoadError(name, f"weight {key} contains NaN or Inf values")
        out[(layer, module)] = (a, b)
    return out


def warn_base_mismatch(name: str, config: dict[str, Any], base: BaseModelSpec) -> None:
    """Logs (only) when the adapter names another base model whose shapes still fit."""
    trained_on = config.get("base_model_name_or_path")
    if trained_on and _model_id(str(trained_on)) != _model_id(base.model_name):
        logger.warning("adapter %r was trained on %r but is served on %r; its shapes fit, loading it anyway",
                       name, trained_on, base.model_name)
    arch = (config.get("auto_mapping") or {}).get("base_model_class") if isinstance(
        config.get("auto_mapping"), dict) else None
    if arch and arch != base.architecture:
        logger.warning("adapter %r was trained on a %s, the base model is a %s; its shapes fit, loading it anyway",
                       name, arch, base.architecture)


def _model_id(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def check_magnitudes(w: LoRAWeights, dtype: torch.dtype) -> None:
    """Refuses an adapter whose update can overflow ``dtype`` (the serving dtype).

    Bound of one output of a module: ``in_features * scale * r * max|A| * max|B|`` for inputs of
    magnitude <= 1; past ``finfo(dtype).max`` the layer emits inf and the text turns to garbage.
    """
    limit = float(torch.finfo(dtype).max)
    if not abs(w.scale) < limit:
        raise AdapterLoadError(w.name, f"scale alpha/r = {w.scale:g} overflows the serving dtype {dtype}")
    for (layer, module), (a, b) in w.weights.items():
        bound = a.shape[1] * abs(w.scale) * a.shape[0] * float(a.abs().max()) * float(b.abs().max())
        if not bound < limit:
            raise AdapterLoadError(w.name, f"layer {layer} {module}: weights times scale ({bound:.3g} at most per "
                                           f"output) overflow the serving dtype {dtype} (max {limit:.3g})")


def module_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def build_weights(name: str, source: str, config: dict[str, Any], plan: WeightPlan,
                  tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], files_id: str) -> LoRAWeights:
    """Assembles ``LoRAWeights``, folding per-module scales (alpha/rank patterns) into B."""
    rslora = bool(config.get("use_rslora", False))
    alpha, rank = float(config.get("lora_alpha", 8)), int(config["r"])
    scale = module_scale(alpha, rank, rslora)
    for key, (a, b) in tensors.items():
        own = module_scale(plan.alphas[key], a.shape[0], rslora)
        if scale == 0 and own != 0:
            raise AdapterLoadError(name, "lora_alpha=0 with a non-zero alpha_pattern entry is not supported")
        if not math.isclose(own, scale, rel_tol=1e-12):
            tensors[key] = (a, b * (own / scale))
    nbytes = sum(a.nbytes + b.nbytes for a, b in tensors.values())
    return LoRAWeights(name=name, source=source, rank=max(a.shape[0] for a, _ in tensors.values()), alpha=alpha,
                       use_rslora=rslora, scale=scale, target_modules=frozenset(m for _, m in tensors),
                       weights=tensors, nbytes=nbytes, fingerprint=files_id)
