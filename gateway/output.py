"""Chains the reasoning and tool-call parsers over one choice's text deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.gateway.reasoning import ReasoningParser
from loraplex.gateway.tool_parser import HermesToolParser, ParsedToolCall


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: ParsedDelta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


class OutputParser:
    """Text deltas → reasoning, content and whole tool calls (each parser optional)."""

    def __init__(self, reasoning: ReasoningParser | None = None, tools: HermesToolParser | None = None) -> None:
        self._reasoning = reasoning
        self._tools = tools
        self.saw_reasoning = False

    def feed(self, text: str) -> ParsedDelta:
        reasoning, content = self._reasoning.feed(text) if self._reasoning else ("", text)
        return self._tool_step(reasoning, content, final=False)

    def flush(self) -> ParsedDelta:
        reasoning, content = self._reasoning.flush() if self._reasoning else ("", "")
        return self._tool_step(reasoning, content, final=True)

    def _tool_step(self, reasoning: str, content: str, *, final: bool) -> ParsedDelta:
        self.saw_reasoning = self.saw_reasoning or bool(reasoning)
        out = ParsedDelta(reasoning=reasoning)
        if self._tools is None:
            out.content = content
            return out
        out.content, out.tool_calls = self._tools.feed(content)
        if final:
            more, calls = self._tools.flush()
            out.content += more
            out.tool_calls.extend(calls)
        return out

    @property
    def tool_calls(self) -> list[ParsedToolCall]:
        return self._tools.calls if self._tools else []


def parse_whole(parser: OutputParser, text: str) -> ParsedDelta:
    """A whole output through the same state machine the stream uses."""
    out = parser.feed(text)
    out.extend(parser.flush())
    return out
