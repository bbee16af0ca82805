"""Match a PEFT adapter's weight keys and shapes against the base model, before any tensor is read.

Accepted key forms (``N`` a layer index, ``M`` one of q/k/v/o/gate/up/down_proj under its
``self_attn`` or ``mlp`` parent, ``NAME`` an optional adapter-name segment such as ``default``)::

    base_model.model.model.layers.N.self_attn.M.lora_A[.NAME].weight
    model.layers.N.mlp.M.lora_B[.NAME].weight
    layers.N.self_attn.M.lora_A.weight
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraplex.errors import AdapterLoadError
from loraplex.lora.types import PACKED_MODULES

if TYPE_CHECKING:
    from loraplex.lora.peft import BaseModelSpec

_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\.(?P<parent>\w+)\."
                  r"(?P<module>\w+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight$")
# module -> the decoder-layer submodule that holds it (Llama / Qwen / Mistral layout)
MODULE_PARENT: dict[str, str] = {m: block for block, modules in PACKED_MODULES.values() for m in modules}
LORA_MODULES: tuple[str, ...] = tuple(MODULE_PARENT)
EMBEDDING_NAMES = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "word_embeddings", "embed_in",
                             "embed_out", "output", "shared"})
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})
Meta = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, safetensors dtype code)


@dataclass
class WeightPlan:
    """What to read: ``modules[(layer, module)] = (key of A, key of B)`` and each module's alpha."""

    modules: dict[tuple[int, str], tuple[str, str]] = field(default_factory=dict)
    alphas: dict[tuple[int, str], float] = field(default_factory=dict)


def plan_weights(name: str, meta: Meta, config: dict[str, Any], base: BaseModelSpec, max_rank: int) -> WeightPlan:
    """Checks every key's name, dtype and shape; returns the A/B key pair of each (layer, module)."""
    if not meta:
        raise AdapterLoadError(name, "the weights file holds no tensors")
    halves: dict[tuple[int, str, str], str] = {}
    adapters: set[str] = set()
    for key, (_shape, dtype) in meta.items():
        layer, module, ab, adapter = parse_key(name, key, base)
        if dtype not in FLOAT_DTYPES:
            raise AdapterLoadError(name, f"weight {key} has dtype {dtype}; expected a float dtype")
        if (layer, module, ab) in halves:
            raise AdapterLoadError(name, f"weights {halves[(layer, module, ab)]} and {key} are duplicates")
        halves[(layer, module, ab)] = key
        adapters.add(adapter)
    if len(adapters) > 1:
        raise AdapterLoadError(name, f"the weights file holds several adapters {sorted(adapters)}; expected one")
    plan = WeightPlan()
    for layer, module, ab in sorted(halves):
        other = "B" if ab == "A" else "A"
        if (layer, module, other) not in halves:
            raise AdapterLoadError(name, f"weight {halves[(layer, module, ab)]} has no matching lora_{other}")
        if ab == "A":
            key_a, key_b = halves[(layer, module, "A")], halves[(layer, module, "B")]
            full = f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}"
            rank = _rank_of(name, config, full, meta[key_a][0], meta[key_b][0], base.module_shapes[module], key_a)
            if rank > max_rank:
                raise AdapterLoadError(name, f"{full}: rank {rank} is above max_lora_rank={max_rank}")
            plan.modules[(layer, module)] = (key_a, key_b)
            plan.alphas[(layer, module)] = float(_pattern_value(config, "alpha_pattern", full,
                                                                config.get("lora_alpha", 8)))
    return plan


def parse_key(name: str, key: str, base: BaseModelSpec) -> tuple[int, str, str, str]:
    """``(layer, module, "A" or "B", adapter-name segment)`` of one key, or a refusal naming it."""
    m = _KEY.match(key)
    if m is None:
        raise AdapterLoadError(name, _why_unmatched(key))
    layer, parent, module = int(m["layer"]), m["parent"], m["module"]
    if MODULE_PARENT.get(module) != parent:
        raise AdapterLoadError(name, f"weight {key} names module {parent}.{module}, which the base model "
                                     f"({base.architecture}) does not have: the adapter was made for another "
                                     "architecture")
    if layer >= base.num_layers:
        raise AdapterLoadError(name, f"weight {key} is for layer {layer}, but the base model has "
                                     f"{base.num_layers} layers")
    return layer, module, m["ab"], m["adapter"] or ""


def _why_unmatched(key: str) -> str:
    parts = set(re.split(r"[.]", key))
    if "lora_magnitude_vector" in parts:
        return f"weight {key} is a DoRA magnitude vector; DoRA is not supported"
    if parts & EMBEDDING_NAMES or any(p.startswith("lora_embedding") for p in parts):
        return f"weight {key} targets the embeddings / lm_head; LoRA on them is not supported"
    if key.endswith(".bias"):
        return f"weight {key} is a LoRA bias; only bias='none' adapters are supported"
    if "modules_to_save" in parts:
        return f"weight {key} belongs to modules_to_save, which is not supported"
    return (f"weight {key} is not a LoRA weight of a decoder layer (layers.N.self_attn|mlp.*_proj): the adapter "
            "was made for another architecture")


def _rank_of(name: str, config: dict[str, Any], full: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...],
             io: tuple[int, int], key_a: str) -> int:
    """The module's rank, after checking ``A [r, in]`` and ``B [out, r]`` against the base and config."""
    in_f, out_f = io
    if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[1] != in_f or shape_b[0] != out_f \
            or shape_a[0] != shape_b[1]:
        raise AdapterLoadError(name, f"{full}: lora_A {list(shape_a)} / lora_B {list(shape_b)} do not fit the "
                                     f"base model, which needs A [r, {in_f}] and B [{out_f}, r] ({key_a})")
    expected = _pattern_value(config, "rank_pattern", full, config.get("r"))
    if shape_a[0] != expected:
        raise AdapterLoadError(name, f"{full}: weights have rank {shape_a[0]} but adapter_config.json says "
                                     f"r={expected}")
    return shape_a[0]


def _pattern_value(config: dict[str, Any], key: str, full: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` rule: the first pattern ``P`` with ``(.*\\.)?(P)$`` matching wins."""
    for pattern, value in (config.get(key) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", full):
            return value
    return default
