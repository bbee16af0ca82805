"""Hypothesis strategies for constraints whose every match is short (so a small max_tokens always
lets a constrained output finish), and the checks that an output satisfies its constraint.

Lengths are bounded in characters; the test tokenizers are byte-level (one token per byte at
most), and a string character is at most a 6-character escape (``\\uXXXX``) or 4 bytes.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any

import jsonschema
from hypothesis import strategies as st

NAMES = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=4)
SCALARS = st.one_of(st.integers(-99, 99), st.text(alphabet=string.ascii_letters + " é\"\\", max_size=3),
                    st.booleans(), st.none())


@st.composite
def _integer(draw: Any) -> dict[str, Any]:
    lo = draw(st.integers(-500, 500))
    return {"type": "integer", "minimum": lo, "maximum": lo + draw(st.integers(0, 600))}


@st.composite
def _number(draw: Any) -> dict[str, Any]:
    lo = draw(st.integers(-50, 50)) + draw(st.sampled_from([0, 0.5, 0.25]))
    return {"type": "number", "minimum": lo, "maximum": lo + draw(st.sampled_from([0.5, 1, 7.75, 40]))}


@st.composite
def _string(draw: Any) -> dict[str, Any]:
    hi = draw(st.integers(0, 4))
    return {"type": "string", "minLength": draw(st.integers(0, hi)), "maxLength": hi}


LEAVES = st.one_of(
    _integer(), _number(), _string(),
    st.lists(SCALARS, min_size=1, max_size=4, unique_by=json.dumps).map(lambda v: {"enum": v}),
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.just({"type": "string", "pattern": "^[a-c]{1,3}$"}),
)


@st.composite
def _array(draw: Any, items: Any) -> dict[str, Any]:
    hi = draw(st.integers(0, 3))
    return {"type": "array", "items": draw(items), "minItems": draw(st.integers(0, hi)), "maxItems": hi}


@st.composite
def _object(draw: Any, values: Any) -> dict[str, Any]:
    props = draw(st.dictionaries(NAMES, values, min_size=1, max_size=3))
    required = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def json_schemas(max_chars: int = 80) -> Any:
    """Random object schemas (nested objects and arrays, enums, bounded numbers and strings) whose
    longest instance has at most ``max_chars`` characters."""
    tree = st.recursive(LEAVES, lambda kids: st.one_of(_array(kids), _object(kids)), max_leaves=4)
    return _object(tree).filter(lambda s: max_chars_of(s) <= max_chars)


def max_chars_of(schema: dict[str, Any]) -> int:
    """An upper bound on the length of any compact instance (", " and ": " separators)."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])  # ascii: an escape is >= the bytes
    kind = schema["type"]
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "number":
        return 16
    if kind == "string":
        return 2 + 6 * schema.get("maxLength", 3)
    if kind in ("boolean", "null"):
        return 5
    if kind == "array":
        n = schema["maxItems"]
        return 2 + n * max_chars_of(schema["items"]) + 2 * max(n - 1, 0)
    props = schema["properties"]
    return 2 + sum(len(json.dumps(k)) + 2 + max_chars_of(v) for k, v in props.items()) + 2 * (len(props) - 1)


_ATOMS = st.sampled_from(["[a-z]", r"\d", "[A-Z0-9]", "x", "-", r"\.", "[^a-z\\n]", "(ab|c)", "é", " "])


@st.composite
def regexes(draw: Any) -> str:
    """Regexes of 1-4 quantified atoms (and one alternation) that Python and xgrammar read alike."""
    parts = []
    for atom in draw(st.lists(_ATOMS, min_size=1, max_size=4)):
        lo = draw(st.integers(0, 2))
        parts.append(atom + draw(st.sampled_from(["", "?", f"{{{lo},{lo + 2}}}", f"{{{lo + 1}}}"])))
    pattern = "".join(parts)
    if draw(st.booleans()):
        pattern = f"({pattern}|{draw(_ATOMS)}{{1,3}})"
    return pattern


CHOICES = st.lists(st.text(alphabet=string.ascii_letters + " é\"\\{}\n", min_size=1, max_size=8),
                   min_size=1, max_size=4, unique=True)


def check_output(kind: str, value: Any, text: str) -> None:
    """Raises AssertionError unless ``text`` satisfies the constraint."""
    if kind == "json":
        jsonschema.validate(json.loads(text), value)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
        assert re.fullmatch(value, text), (value, text)
    elif kind == "choice":
        assert text in value, (value, text)
    else:
        raise AssertionError(kind)
