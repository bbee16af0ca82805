"""Stop strings matched over a stream of text deltas.

A stop string can span several deltas ("<|e" + "nd|>"), so the tail of the
text that could still become a stop string is held back instead of being
emitted and later retracted. The request stops at the first stop string to be
completed (the occurrence with the smallest end; among those, the longest),
which is also where generation would have stopped had it been checked after
every character.
"""

from __future__ import annotations


class StopStringMatcher:
    """Feeds text deltas through; cuts the text at the first stop string.

    ``push(delta) -> (emit, stopped)``: ``emit`` is text safe to show now;
    ``stopped`` is the stop string that matched (then the stream is over).
    ``flush()`` releases the held-back tail when the request ends otherwise.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False):
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        self.stop = list(dict.fromkeys(stop))  # unique, order kept
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped: str | None = None  # the stop string that ended the stream
        self._held = ""  # tail that is a proper prefix of some stop string

    @property
    def held(self) -> str:
        """Text received but not yet emitted."""
        return self._held

    def push(self, delta: str) -> tuple[str, str | None]:
        if self.stopped is not None:
            return "", None  # already stopped: ignore anything after
        buf = self._held + delta
        match = self._first_match(buf, search_from=len(self._held))
        if match is not None:
            start, stop = match
            self.stopped, self._held = stop, ""
            end = start + len(stop) if self.include_stop_str_in_output else start
            return buf[:end], stop
        keep = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Releases the held-back text (the request ended without a stop string)."""
        text, self._held = self._held, ""
        return text

    def _first_match(self, buf: str, search_from: int) -> tuple[int, str] | None:
        """(start, stop string) of the occurrence that ends first, ending after ``search_from``."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop string)
        for s in self.stop:
            start = buf.find(s, max(0, search_from - len(s) + 1))
            if start >= 0:
                candidate = (start + len(s), -len(s), s)
                best = candidate if best is None else min(best, candidate)
        if best is None:
            return None
        end, neg_len, s = best
        return end + neg_len, s

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        return max((_longest_prefix_at_end(buf, s) for s in self.stop), default=0)


def _longest_prefix_at_end(text: str, stop: str) -> int:
    """Largest k < len(stop) with text.endswith(stop[:k])."""
    tail = text[-(len(stop) - 1) :] if len(stop) > 1 else ""
    i = tail.find(stop[0])
    while i >= 0:
        if stop.startswith(tail[i:]):
            return len(tail) - i
        i = tail.find(stop[0], i + 1)
    return 0
