"""One typed configuration tree, validated when built.

Each field carries its help text and bounds in ``metadata``; ``validate`` checks
the bounds and names the bad value, and the CLI builds its flags from the same
fields (``loraplex.backend.cli_args``). Nothing here reads the environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from loraplex.errors import ConfigError


def opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
        choices: tuple[Any, ...] | None = None, factory: bool = False) -> Any:
    """A config field with its help text and bounds (inclusive)."""
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


class _Validated:
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            lo, hi, choices = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("choices")
            if value is None or isinstance(value, (list, tuple, dict)):
                continue
            if choices is not None and value not in choices:
                raise ConfigError(f"{f.name}={value!r}: must be one of {list(choices)}")
            if lo is not None and value < lo:
                raise ConfigError(f"{f.name}={value!r}: must be >= {lo}")
            if hi is not None and value > hi:
                raise ConfigError(f"{f.name}={value!r}: must be <= {hi}")
        self.check()

    def check(self) -> None:
        """Cross-field invariants; subclasses override."""


@dataclass
class ModelConfig(_Validated):
    model: str | None = opt(None, "HF model directory or hub id; none = the built-in demo model")
    revision: str | None = opt(None, "hub revision of the model")
    dtype: str = opt("auto", "weights and activations dtype; auto = bfloat16 on CUDA, float32 on CPU",
                     choices=("auto", "float32", "float16", "bfloat16"))
    max_model_len: int | None = opt(None, "longest prompt + output; none = the model's own limit", lo=16)
    device: str = opt("auto", "auto = cuda when available, else cpu", choices=("auto", "cpu", "cuda"))
    seed: int = opt(0, "seed of the engine's global generator (requests without their own seed)", lo=0)
    tokenizer: str | None = opt(None, "tokenizer directory; none = the model's")
    enforce_eager: bool = opt(False, "never capture CUDA graphs (decode steps are captured and replayed on CUDA)")
    max_capture_tokens: int = opt(2048, "on CUDA, prefill and mixed steps of up to this many tokens (and at most "
                                  "max_num_batched_tokens) are captured in CUDA graphs too, one per token bucket; "
                                  "0 = decode steps only", lo=0)


@dataclass
class CacheConfig(_Validated):
    block_size: int = opt(16, "tokens per KV-cache block", choices=(1, 2, 4, 8, 16, 32, 64, 128))
    gpu_memory_utilization: float = opt(0.9, "share of GPU memory the engine may use (weights + KV)", lo=0.05, hi=0.99)
    kv_cache_memory_bytes: int | None = opt(
        None, "KV cache size in bytes; on CPU none = 256 MiB; on CUDA it replaces gpu_memory_utilization", lo=1)
    num_gpu_blocks_override: int | None = opt(None, "number of KV blocks, overriding the computed capacity", lo=1)
    enable_prefix_caching: bool = opt(True, "reuse KV blocks of identical prefixes (keyed by adapter version too)")


@dataclass
class SchedulerConfig(_Validated):
    max_num_seqs: int = opt(64, "most requests running in one step", lo=1, hi=4096)
    max_num_batched_tokens: int = opt(2048, "token budget of one step (prefill chunks + decodes)", lo=1)
    max_waiting_requests: int = opt(1024, "bounded waiting queue; past it requests are refused at once", lo=1)
    policy: str = opt("fcfs", "fcfs, or priority (lower value first, then arrival)", choices=("fcfs", "priority"))
    enable_chunked_prefill: bool = opt(True, "split long prompts over several steps")
    async_scheduling: bool = opt(True, "launch step N+1 before processing step N's tokens when they can stay on "
                                       "the GPU (greedy rows), so host work overlaps device work")
    max_admission_bypass: int = opt(64, "admissions that may pass a request waiting for its adapter to load; "
                                        "then no one behind it is admitted before it", lo=0)
    max_admission_wait: float = opt(5.0, "seconds a request may wait for its adapter to load while others pass it; "
                                         "then no one behind it is admitted before it", lo=0.0)


@dataclass
class LoRAConfig(_Validated):
    enable_lora: bool = opt(True, "allow LoRA adapters")
    max_loras: int = opt(8, "GPU adapter slots: most distinct adapters in one step", lo=1, hi=1024)
    max_lora_rank: int = opt(64, "largest adapter rank accepted (slots are padded to it)", lo=1, hi=1024)
    max_cpu_loras: int = opt(64, "adapters kept in host memory (LRU by last use; pinned memory on CUDA); "
                                 "thousands are fine, the rest are re-read from their source when needed", lo=1)
    adapter_load_threads: int = opt(2, "threads that read adapter files and write GPU slots in the background",
                                    lo=1, hi=64)
    adapter_roots: list[str] = opt(list, "directories local adapter sources must resolve inside, besides "
                                         "adapter_dir and the built-in demo adapters; empty = only those",
                                   factory=True)
    allow_hub_adapters: bool = opt(False, "allow adapter sources that are Hugging Face hub ids (org/name)")
    hub_adapter_orgs: list[str] = opt(list, "with allow_hub_adapters: the only hub organisations allowed; "
                                            "empty = any", factory=True)
    adapter_dir: str | None = opt(None, "directory whose sub-directories load on first use by name")
    allow_pickle: bool = opt(False, "accept pickle adapter weights (.bin/.pt); unsafe")
    max_adapter_bytes: int = opt(2 * 2**30, "largest adapter weights file accepted, in bytes", lo=1)
    preload: list[str] = opt(list, "adapters to load at start, as NAME=SOURCE", factory=True)


@dataclass
class EngineConfig(_Validated):
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    stuck_step_seconds: float = opt(60.0, "a step running longer than this marks the engine unhealthy", lo=1.0)
    tensor_parallel_size: int = opt(1, "shard the model over this many worker processes (one GPU each; gloo "
                                       "processes on CPU); 1 = the model runs in the engine process", lo=1, hi=64)

    def check(self) -> None:
        s = self.scheduler
        if not s.enable_chunked_prefill and self.model.max_model_len is not None \
                and s.max_num_batched_tokens < self.model.max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens={s.max_num_batched_tokens}: must be >= max_model_len="
                f"{self.model.max_model_len} when chunked prefill is off")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Builds the tree from flat vLLM-style names (``max_num_seqs=8``)."""
        parts: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "scheduler": {}, "lora": {}}
        top: dict[str, Any] = {}
        owners = {f.name: name for name, sub in _SECTIONS.items() for f in dataclasses.fields(sub)}
        for key, value in kwargs.items():
            if key in owners:
                parts[owners[key]][key] = value
            elif key in {f.name for f in dataclasses.fields(cls)} and key not in parts:
                top[key] = value
            else:
                raise ConfigError(f"unknown engine argument {key!r}")
        return cls(**{name: _SECTIONS[name](**values) for name, values in parts.items()}, **top)


_SECTIONS: dict[str, type] = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                              "lora": LoRAConfig}
