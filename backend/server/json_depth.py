"""A nesting bound for JSON fields (tools_json, chat_template_kwargs_json, tool_calls_json).

``json.loads`` recurses once per level, so 100k ``[`` raise RecursionError deep inside the
parser; the text is scanned first (linear, no recursion) and refused past ``MAX_JSON_DEPTH``.
"""

from __future__ import annotations

import re

from loraplex.backend.server.messages import Msg
from loraplex.errors import InvalidRequestError

MAX_JSON_DEPTH = 64
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')  # strings (skipped whole) and brackets


def json_depth(text: str) -> int:
    """Deepest bracket nesting of ``text`` outside strings."""
    depth = deepest = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def check_json_depth(field_name: str, text: str, limit: int = MAX_JSON_DEPTH) -> None:
    if json_depth(text) > limit:
        raise InvalidRequestError(field_name, Msg.JSON_TOO_DEEP.format(limit=limit))
