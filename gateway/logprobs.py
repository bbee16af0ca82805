"""Backend ``TokenLogprob`` messages → OpenAI's two logprobs shapes.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
Completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

from loraplex.gateway.responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way


class _Top(Protocol):
    token: str
    logprob: float


class _TokenLogprob(Protocol):
    token: str
    logprob: float

    @property
    def top(self) -> Iterable[_Top]: ...


def clamp(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="surrogatepass"))


def chat_logprobs(entries: Iterable[_TokenLogprob], top_k: int) -> ChatLogprobs:
    """The chat shape; ``top_k`` alternatives per position (the backend may send more)."""
    content = [
        ChatTokenLogprob(
            token=e.token,
            logprob=clamp(e.logprob),
            bytes=_bytes(e.token),
            top_logprobs=[TopLogprob(token=t.token, logprob=clamp(t.logprob), bytes=_bytes(t.token))
                          for t in list(e.top)[:top_k]],
        )
        for e in entries
    ]
    return ChatLogprobs(content=content)


def completion_logprobs(entries: Iterable[_TokenLogprob], top_k: int, start_offset: int) -> CompletionLogprobs:
    """The completions shape; ``text_offset`` counts from ``start_offset`` in the returned text."""
    out = CompletionLogprobs()
    offset = start_offset
    for e in entries:
        out.tokens.append(e.token)
        out.token_logprobs.append(clamp(e.logprob))
        top = {t.token: clamp(t.logprob) for t in list(e.top)[:top_k]}
        top[e.token] = clamp(e.logprob)  # the chosen token wins a clash of equal texts
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(e.token)
    return out


def merge_completion(into: CompletionLogprobs | None, more: CompletionLogprobs) -> CompletionLogprobs:
    if into is None:
        return more
    into.tokens.extend(more.tokens)
    into.token_logprobs.extend(more.token_logprobs)
    into.top_logprobs.extend(more.top_logprobs)
    into.text_offset.extend(more.text_offset)
    return into
