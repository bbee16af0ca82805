"""StopStringMatcher: streamed output equals the stop rule applied to the whole text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.backend.engine.stop import StopStringMatcher

HYPOTHESIS = settings(max_examples=400, deadline=None)
ALPHABET = "ab c\n😀你"  # small, so stop strings occur often
TEXT = st.text(alphabet=ALPHABET, max_size=40)
STOPS = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), min_size=1, max_size=4)
CUTS = st.lists(st.integers(0, 10**6), max_size=10)


def reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Naive rule on the whole text: cut at the occurrence ending first (ties: the longest)."""
    hits = [(i + len(s), -len(s), s) for s in stops for i in range(len(text)) if text.startswith(s, i)]
    if not hits:
        return text, None
    end, neg_len, s = min(hits)
    return text[: end if include else end + neg_len], s


def longest_partial(text: str, stops: list[str]) -> int:
    """Naive: longest suffix of ``text`` that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def stream(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, str | None]:
    """Pushes the deltas like the engine does; flushes when no stop string matched."""
    out = []
    for delta in deltas:
        emit, stopped = matcher.push(delta)
        out.append(emit)
        if stopped is not None:
            return "".join(out), stopped
    return "".join(out) + matcher.flush(), None


@pytest.mark.parametrize("include", [False, True])
@HYPOTHESIS
@given(text=TEXT, stops=STOPS, cuts=CUTS)
def test_streamed_equals_whole_text_reference(
    include: bool, text: str, stops: list[str], cuts: list[int]
) -> None:
    matcher = StopStringMatcher(stops, include_stop_str_in_output=include)
    assert stream(matcher, split(text, cuts)) == reference(text, stops, include)


@HYPOTHESIS
@given(text=TEXT, stops=STOPS, cuts=CUTS)
def test_holds_back_exactly_the_possible_stop_prefix(text: str, stops: list[str], cuts: list[int]) -> None:
    """Emitted text is never retracted, and only a possible stop-string start is held."""
    matcher = StopStringMatcher(stops)
    seen, emitted = "", ""
    for delta in split(text, cuts):
        seen += delta
        emit, stopped = matcher.push(delta)
        emitted += emit
        if stopped is not None:
            break
        assert emitted + matcher.held == seen
        assert len(matcher.held) == longest_partial(seen, stops)


def test_stop_string_spanning_deltas() -> None:
    matcher = StopStringMatcher(["<|end|>"])
    assert matcher.push("Hello <|") == ("Hello ", None)
    assert matcher.push("en") == ("", None)
    assert matcher.push("d|> tail") == ("", "<|end|>")
    assert matcher.push("more") == ("", None)  # ignored after the stop


def test_include_stop_string() -> None:
    matcher = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert matcher.push("abST") == ("ab", None)
    assert matcher.push("OPcd") == ("STOP", "STOP")


def test_false_start_is_released() -> None:
    matcher = StopStringMatcher(["abc"])
    assert matcher.push("xab") == ("x", None)
    assert matcher.push("d") == ("abd", None)
    assert matcher.push("ab") == ("", None)
    assert matcher.flush() == "ab"


def test_first_completed_stop_wins() -> None:
    matcher = StopStringMatcher(["abc", "b"])
    assert matcher.push("xab") == ("xa", "b")  # "b" completes before "abc" could
    matcher = StopStringMatcher(["c", "abc"])
    assert matcher.push("xabc") == ("x", "abc")  # same end: the longer one


def test_no_stop_strings_is_a_passthrough() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("anything") == ("anything", None)
    assert matcher.flush() == ""


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])
