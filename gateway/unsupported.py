"""OpenAI request parameters this server does not implement: each is either honoured (a value
that asks for what the server does anyway) or refused with a 400 naming it, never silently
dropped. Parameters OpenAI does not define are still ignored, as vLLM does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loraplex.gateway.errors import bad_request


def _null(value: Any) -> bool:
    return value is None


def _not_true(value: Any) -> bool:
    return value is None or value is False


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


# name → (the values honoured, what the server does instead)
CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "reasoning_effort": (_null, "reasoning is controlled with chat_template_kwargs (enable_thinking)"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "there is one service tier: 'auto' or 'default'"),
    "store": (_not_true, "completions are not stored"),
    "metadata": (_empty, "completions are not stored, so they carry no metadata"),
    "modalities": (lambda v: v is None or v == ["text"], "only text output"),
    "audio": (_null, "no audio output"),
    "prediction": (_null, "predicted outputs are not supported"),
    "web_search_options": (_null, "no web search"),
    "verbosity": (_null, "the model's verbosity is not adjustable"),
    "functions": (_empty, "use 'tools' (the legacy 'functions' is not supported)"),
    "function_call": (_null, "use 'tool_choice' (the legacy 'function_call' is not supported)"),
}
COMPLETIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "service_tier": CHAT["service_tier"],
}


def refuse_unsupported(body: Any, table: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """400 for the first parameter of ``table`` whose value this server cannot honour."""
    if not isinstance(body, dict):
        return
    for name, (honoured, instead) in table.items():
        if name in body and not honoured(body[name]):
            raise bad_request(f"'{name}' = {body[name]!r} is not supported by this server: {instead}.", name,
                              "unsupported_parameter")
