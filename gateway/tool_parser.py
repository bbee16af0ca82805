"""Hermes-style tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Incremental, like the reasoning parser: text before a call streams as content;
a call is held until ``</tool_call>`` (or the end of the output) and then comes out
whole, with an id ``call_…`` and its arguments as a JSON string. A closed block whose JSON
does not parse, or lacks a name, is handed back as plain content, unchanged; an unclosed
one that does not parse (cut off by max_tokens) is dropped.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass

from loraplex.gateway.reasoning import partial_suffix

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
_ID_CHARS = string.ascii_letters + string.digits


def tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as a string


def parse_call(body: str) -> ParsedToolCall | None:
    """One block's JSON → a tool call, or None when it is not a well-formed call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        arguments = args
    else:
        arguments = json.dumps(args, ensure_ascii=False)
    return ParsedToolCall(id=tool_call_id(), name=obj["name"], arguments=arguments)


class HermesToolParser:
    """Feeds content deltas; each call returns ``(content_delta, finished_tool_calls)``."""

    def __init__(self) -> None:
        self._in_call = False
        self._buf = ""
        self._pending_ws = ""  # whitespace after a call, dropped unless more text follows
        self.calls: list[ParsedToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        self._buf += text
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        while True:
            progressed = self._call_step(content, calls) if self._in_call else self._content_step(content)
            if not progressed:
                break
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ParsedToolCall]]:
        held, self._buf = self._buf, ""
        if not self._in_call:
            return self._content(held), []
        self._in_call = False
        call = parse_call(held.strip())
        if call is None:  # a call cut off (max_tokens): dropped, never raw markup in the content
            return "", []
        self.calls.append(call)
        return "", [call]

    def _content_step(self, out: list[str]) -> bool:
        start = self._buf.find(CALL_START)
        if start >= 0:
            out.append(self._content(self._buf[:start]))
            self._buf = self._buf[start + len(CALL_START):]
            self._in_call = True
            return True
        keep = partial_suffix(self._buf, CALL_START)
        ready = self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep:]
        out.append(self._content(ready))
        return False

    def _call_step(self, content: list[str], calls: list[ParsedToolCall]) -> bool:
        end = self._buf.find(CALL_END)
        if end < 0:
            return False
        body, self._buf = self._buf[:end], self._buf[end + len(CALL_END):]
        self._in_call = False
        call = parse_call(body.strip())
        if call is None:
            content.append(self._content(CALL_START + body + CALL_END))
        else:
            self.calls.append(call)
            calls.append(call)
        return True

    def _content(self, text: str) -> str:
        """Content text, holding back whitespace that follows a tool call."""
        if not self.calls:
            return text
        if not text.strip():
            self._pending_ws += text
            return ""
        out, self._pending_ws = self._pending_ws + text, ""
        return out


def extract_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """A whole output → ``(content or None, tool_calls)``."""
    parser = HermesToolParser()
    c1, calls1 = parser.feed(text)
    c2, calls2 = parser.flush()
    content = c1 + c2
    calls = calls1 + calls2
    if calls and not content.strip():
        return None, calls
    return content, calls
