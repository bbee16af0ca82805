"""Sampling and stopping parameters, with vLLM / OpenAI field names."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from loraplex.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
MAX_CONSTRAINT_CHARS = 512 * 1024  # a schema, regex or grammar (as JSON text)
MAX_CHOICES = 1024
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Constrained decoding (vLLM's names): set exactly one field; the output must match it.

    ``json``: a JSON Schema (dict or JSON text); ``json_object``: any JSON object; ``regex``: the
    whole output matches it; ``choice``: the output is one of these strings; ``grammar``: an
    EBNF/GBNF grammar with a ``root`` rule; ``structural_tag``: xgrammar's structural-tag JSON.
    ``field_prefix`` and ``field_names`` only say how errors name the fields (the gRPC edge sets
    them to the proto's names). The engine compiles the constraint when the request arrives.
    """

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    field_prefix: str = "structured_outputs"
    field_names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kinds = self.kinds()
        _check(len(kinds) == 1, self.field_prefix,
               f"set exactly one of {', '.join(STRUCTURED_KINDS)}; got {', '.join(kinds) or 'none'}")
        if isinstance(self.json, str):
            self.json = _json_dict(self.field_name("json"), self.json)
        for name in ("json", "regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None:
                _check_text(self.field_name(name), value if isinstance(value, str) else json.dumps(value))
        if self.choice is not None:
            self._check_choice()

    def _check_choice(self) -> None:
        name = self.field_name("choice")
        assert self.choice is not None
        self.choice = list(self.choice)
        _check(0 < len(self.choice) <= MAX_CHOICES, name, f"give 1 to {MAX_CHOICES} strings, got {len(self.choice)}")
        for s in self.choice:
            _check(isinstance(s, str) and len(s) > 0, name, "each choice must be a non-empty string")
        _check_text(name, "".join(self.choice))

    def kinds(self) -> list[str]:
        """The constraint fields that are set."""
        return [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        return self.kinds()[0]

    def field_name(self, kind: str) -> str:
        """The field an error about ``kind`` names, e.g. ``structured_outputs.json``."""
        return f"{self.field_prefix}.{self.field_names.get(kind, kind)}"


def _json_dict(field_name: str, text: str) -> dict[str, Any]:
    _check_text(field_name, text)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(field_name, f"not valid JSON: {exc}") from exc
    _check(isinstance(value, dict), field_name, "must be a JSON object (a JSON Schema)")
    return value


def _check_text(field_name: str, text: str) -> None:
    _check(isinstance(text, str) and len(text) > 0, field_name, "must not be empty")
    _check(len(text) <= MAX_CONSTRAINT_CHARS, field_name,
           f"at most {MAX_CONSTRAINT_CHARS} characters, got {len(text)}")


@dataclass
class SamplingParams:
    """How one request samples and when it stops. Validated at construction."""

    n: int = 1
    temperature: float = 1.0  # 0 = greedy; [0, 2]
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 or -1 = off; else >= 1
    min_p: float = 0.0  # [0, 1]
    repetition_penalty: float = 1.0  # (0, 2]
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per generated token, [0, 20]
    prompt_logprobs: int | None = None  # [0, 20]
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding; a dict is accepted

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        _check(self.n == 1, "n", f"must be 1 in the engine (fan out above it), got {self.n}")
        _finite("temperature", self.temperature)
        _check(0.0 <= self.temperature <= 2.0, "temperature", f"must be in [0, 2], got {self.temperature}")
        _finite("top_p", self.top_p)
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be -1, 0 (off) or >= 1, got {self.top_k}")
        _finite("min_p", self.min_p)
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _finite("repetition_penalty", self.repetition_penalty)
        _check(
            0.0 < self.repetition_penalty <= 2.0,
            "repetition_penalty",
            f"must be in (0, 2], got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _finite(name, value)
            _check(-2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value}")
        if self.seed is not None:
            _check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2^63), got {self.seed}")
        if self.max_tokens is not None:
            _check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        _check(
            len(self.stop) <= MAX_STOP_STRINGS,
            "stop",
            f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}",
        )
        for s in self.stop:
            _check(isinstance(s, str) and len(s) > 0, "stop", "stop strings must be non-empty")
            _check(
                len(s) <= MAX_STOP_STRING_CHARS,
                "stop",
                f"each stop string at most {MAX_STOP_STRING_CHARS} characters, got {len(s)}",
            )
        _check(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
            "stop_token_ids",
            f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check(0 <= value <= MAX_LOGPROBS, name, f"must be in [0, {MAX_LOGPROBS}], got {value}")

    def check_vocab(self, vocab_size: int) -> None:
        """Checks the fields that depend on the model (token ids)."""
        for t in self.stop_token_ids:
            _check(0 <= t < vocab_size, "stop_token_ids", f"token id {t} outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(field_name, message)


def _finite(field_name: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value), field_name, f"must be a finite number, got {value}")
