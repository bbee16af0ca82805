"""argparse flags generated from typed config dataclasses (``loraplex.config.opt`` fields).

Every field becomes ``--field-name`` with the field's help, bounds, choices and
default. Flags a user does not give stay unset (``argparse.SUPPRESS``), so the
dataclass defaults apply and the dataclass validates (errors name the value).
Torch-free: the backend's and the gateway's CLIs both build their flags here.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any


def add_fields(group: Any, cls: type, fields: list[dataclasses.Field[Any]] | None = None, *,
               aliases: Mapping[str, tuple[str, ...]] | None = None,
               metavars: Mapping[str, str] | None = None,
               item_types: Mapping[str, Callable[[str], Any]] | None = None) -> None:
    """One flag per field of ``cls`` (or of ``fields``); list fields are repeatable flags."""
    hints = typing.get_type_hints(cls)
    for f in fields if fields is not None else dataclasses.fields(cls):
        names = (f"--{f.name.replace('_', '-')}", *(aliases or {}).get(f.name, ()))
        metavar = (metavars or {}).get(f.name)
        group.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, help=field_help(f, metavar),
                           **flag_kind(hints[f.name], f, metavar, (item_types or {}).get(f.name, str)))


def flag_kind(hint: Any, f: dataclasses.Field[Any], metavar: str | None = None,
              item_type: Callable[[str], Any] = str) -> dict[str, Any]:
    """argparse keywords for a field of type ``hint``."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is list:
        return {"action": "append", "metavar": metavar or "VALUE", "type": item_type}
    kind: dict[str, Any] = {"type": _maybe_none(base) if optional else base,
                            "metavar": metavar or base.__name__.upper()}
    choices = f.metadata.get("choices")
    if choices:
        kind["choices"] = list(choices)
        if all(isinstance(c, str) and c == c.lower() for c in choices):
            kind["type"] = str.lower  # any casing on the command line
        kind.pop("metavar")
    return kind


def field_help(f: dataclasses.Field[Any], metavar: str | None = None) -> str:
    """The field's help with its range and default (and "repeat" for list fields)."""
    meta = f.metadata
    parts = [meta.get("help", "")]
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None or hi is not None:
        parts.append(f"range [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default not in (None, [], dataclasses.MISSING):
        parts.append(f"default: {default}")
    elif default is None:
        parts.append("default: none")
    if isinstance(default, list):
        parts.append("repeat the flag for several")
    return "; ".join(p for p in parts if p).replace("%", "%%")


def given_fields(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of ``cls``'s fields the user gave on the command line."""
    given = vars(args)
    return {f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}


def _maybe_none(base: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "") else base(text)

    parse.__name__ = base.__name__
    return parse
