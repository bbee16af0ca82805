"""Splits ``<think>…</think>`` reasoning from the answer, incrementally.

One state machine serves both streaming and whole outputs (the whole output is fed
at once), so a streamed answer and a non-streamed one split identically.

    parser = ReasoningParser()
    parser.feed("<think>plan ")     # → ("plan", "")
    parser.feed("</think>\\nHi")     # → ("", "Hi")
    parser.flush()                  # → ("", "")

``starts_in_reasoning=True`` is for chat templates that already opened ``<think>``
in the prompt: the output is reasoning until ``</think>``.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    """Feeds text deltas; each call returns ``(reasoning_delta, content_delta)``."""

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self._state = "start"
        self._opened = starts_in_reasoning
        self._buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning, content = "", ""
        while self._buf:
            step = self._step()
            if step is None:
                break
            reasoning += step[0]
            content += step[1]
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """Whatever is held back at the end of the output."""
        held, self._buf = self._buf, ""
        if self._state == "start":
            return (held.lstrip(), "") if self._opened else ("", held)
        if self._state in ("reasoning", "reasoning_lead"):
            return held, ""
        return "", held

    def _step(self) -> tuple[str, str] | None:
        """One transition; None when more text is needed."""
        return getattr(self, f"_on_{self._state}")()

    def _on_start(self) -> tuple[str, str] | None:
        stripped = self._buf.lstrip()
        if stripped.startswith(THINK_START):
            self._buf = stripped[len(THINK_START):]
            self._state = "reasoning_lead"
            return "", ""
        if not stripped or THINK_START.startswith(stripped):
            return None  # could still become <think>
        self._state = "reasoning_lead" if self._opened else "content"
        return "", ""

    def _on_reasoning_lead(self) -> tuple[str, str] | None:
        return self._skip_lead("reasoning")

    def _on_content_lead(self) -> tuple[str, str] | None:
        return self._skip_lead("content")

    def _skip_lead(self, next_state: str) -> tuple[str, str] | None:
        self._buf = self._buf.lstrip()
        if not self._buf:
            return None
        self._state = next_state
        return "", ""

    def _on_reasoning(self) -> tuple[str, str] | None:
        end = self._buf.find(THINK_END)
        if end >= 0:
            reasoning, self._buf = self._buf[:end].rstrip(), self._buf[end + len(THINK_END):]
            self._state = "content_lead"
            return reasoning, ""
        # hold back a partial </think> and the whitespace before it (dropped if the tag follows)
        ready = self._buf[: len(self._buf) - partial_suffix(self._buf, THINK_END)].rstrip()
        out, self._buf = ready, self._buf[len(ready):]
        return (out, "") if out else None

    def _on_content(self) -> tuple[str, str] | None:
        out, self._buf = self._buf, ""
        return "", out


def split_reasoning(text: str, starts_in_reasoning: bool = False) -> tuple[str | None, str]:
    """A whole output → ``(reasoning or None, content)``."""
    parser = ReasoningParser(starts_in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.flush()
    reasoning = r1 + r2
    return (reasoning if reasoning or parser_saw_think(text, starts_in_reasoning) else None), c1 + c2


def parser_saw_think(text: str, starts_in_reasoning: bool) -> bool:
    return starts_in_reasoning or text.lstrip().startswith(THINK_START)
