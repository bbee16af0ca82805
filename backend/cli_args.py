"""argparse flags generated from the typed config dataclasses.

Every field of ``ModelConfig``, ``CacheConfig``, ``SchedulerConfig``,
``LoRAConfig``, the top of ``EngineConfig`` and ``ServerConfig`` becomes
``--field-name`` with the field's help, bounds, choices and default. Flags a
user does not give stay unset, so the dataclass defaults apply and the
dataclasses validate (errors name the value). Imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any

from loraplex.backend.server.config import ServerConfig
from loraplex.cli_flags import add_fields, given_fields
from loraplex.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.errors import ConfigError

ENGINE_SECTIONS: dict[str, type] = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                                    "lora": LoRAConfig}
ALIASES = {"preload": ("--lora",)}
METAVARS = {"preload": "NAME=SOURCE", "adapter_roots": "DIR", "hub_adapter_orgs": "ORG"}
API_KEY_ENV = "LORAPLEX_API_KEY"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per config field, grouped by section."""
    for title, cls in ENGINE_SECTIONS.items():
        _add_fields(parser.add_argument_group(f"{title} options"), cls)
    engine_top = [f for f in dataclasses.fields(EngineConfig) if f.name not in ENGINE_SECTIONS]
    _add_fields(parser.add_argument_group("engine options"), EngineConfig, engine_top)
    server = parser.add_argument_group("server options")
    _add_fields(server, ServerConfig)
    server.add_argument("--api-key-file", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"read the bearer token from this file (else --api-key, else ${API_KEY_ENV})")


def _add_fields(group: Any, cls: type, fields: list[dataclasses.Field[Any]] | None = None) -> None:
    add_fields(group, cls, fields, aliases=ALIASES, metavars=METAVARS, item_types={"preload": _name_equals_source})


def _name_equals_source(text: str) -> str:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SOURCE")
    return text


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The engine config of the flags given (defaults for the rest), validated."""
    given = vars(args)
    names = {f.name for cls in ENGINE_SECTIONS.values() for f in dataclasses.fields(cls)}
    names |= {f.name for f in dataclasses.fields(EngineConfig) if f.name not in ENGINE_SECTIONS}
    return EngineConfig.from_kwargs(**{k: v for k, v in given.items() if k in names})


def server_config_from_args(args: argparse.Namespace, environ: typing.Mapping[str, str] | None = None) -> ServerConfig:
    """The server config of the flags given; the token comes from --api-key, --api-key-file or the env."""
    given = vars(args)
    kwargs = given_fields(args, ServerConfig)
    kwargs["api_key"] = resolve_api_key(given.get("api_key"), given.get("api_key_file"), environ)
    return ServerConfig(**kwargs)


def resolve_api_key(key: str | None, key_file: str | None, environ: typing.Mapping[str, str] | None = None) -> str | None:
    """--api-key, else the first line of --api-key-file, else $LORAPLEX_API_KEY, else None (read now, not at import)."""
    if key:
        return key
    if key_file:
        try:
            text = Path(key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"api_key_file={key_file!r}: {exc.strerror or exc}") from exc
        if not text:
            raise ConfigError(f"api_key_file={key_file!r}: the file is empty")
        return text.splitlines()[0].strip()
    env = os.environ if environ is None else environ
    return env.get(API_KEY_ENV) or None


_HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
HUB_PROBE_SECONDS = 1.5


def check_model_source(model: str | None, revision: str | None = None) -> None:
    """Fails fast, before any engine is built, when ``--model`` cannot be found.

    A path-like value must be a directory; anything else must be a well-formed hub id that is in
    the local cache or, unless HF_HUB_OFFLINE is set, answers on the hub within a second or two.
    """
    if model is None:
        return
    hint = "give a local model directory, a hub id (org/name), or leave --model out for the built-in demo model"
    if model.startswith(("/", ".", "~")) or os.sep in model.strip("/").replace("/", "", 1) or Path(model).exists():
        if not Path(model).expanduser().is_dir():
            raise ConfigError(f"model={model!r}: no such directory; {hint}")
        return
    if not _HUB_MODEL_ID.match(model) or ".." in model:
        raise ConfigError(f"model={model!r}: neither a local directory nor a valid hub id; {hint}")
    _check_hub_model(model, revision, hint)


def _check_hub_model(model: str, revision: str | None, hint: str) -> None:
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"model={model!r}: not in the local hub cache and HF_HUB_OFFLINE is set; download it "
                          f"first (huggingface-cli download {model}) or {hint}")
    try:
        HfApi().model_info(model, revision=revision, timeout=HUB_PROBE_SECONDS)
    except Exception as exc:  # unreachable, unknown repo, gated: all stop here with the reason
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConfigError(f"model={model!r}: could not be found on the Hugging Face hub ({reason}); check the "
                          f"id and the network, or {hint}") from None
