"""Reasoning and hermes tool-call parsing: whole outputs, and streams cut anywhere."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.gateway.output import OutputParser, ParsedDelta, parse_whole
from loraplex.gateway.reasoning import ReasoningParser, partial_suffix, split_reasoning
from loraplex.gateway.tool_parser import HermesToolParser, extract_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def stream(parser: OutputParser, text: str, cuts: list[int]) -> ParsedDelta:
    out = ParsedDelta()
    last = 0
    for cut in sorted(set(c % (len(text) + 1) for c in cuts)) + [len(text)]:
        out.extend(parser.feed(text[last:cut]))
        last = cut
    out.extend(parser.flush())
    return out


def test_partial_suffix() -> None:
    assert partial_suffix("abc<thi", "<think>") == 4
    assert partial_suffix("abc", "<think>") == 0
    assert partial_suffix("<think>", "<think>") == 0  # a whole tag is not a partial one


def test_reasoning_split() -> None:
    assert split_reasoning("<think>\nplan\n</think>\n\nanswer") == ("plan", "answer")
    assert split_reasoning("<think>a \n b\n</think>c") == ("a \n b", "c")
    assert split_reasoning("no tags here") == (None, "no tags here")
    assert split_reasoning("a <think>b</think>") == (None, "a <think>b</think>")  # only a leading tag opens
    assert split_reasoning("<think>cut off") == ("cut off", "")
    assert split_reasoning("<think></think>x") == ("", "x")


def test_reasoning_opened_by_the_template() -> None:
    assert split_reasoning("plan</think>answer", starts_in_reasoning=True) == ("plan", "answer")
    assert split_reasoning("<think>plan</think>answer", starts_in_reasoning=True) == ("plan", "answer")
    assert split_reasoning("still thinking", starts_in_reasoning=True) == ("still thinking", "")


def test_reasoning_holds_back_a_partial_tag_only() -> None:
    p = ReasoningParser()
    assert p.feed("<thi") == ("", "")
    assert p.feed("nk>abc </th") == ("abc", "")
    assert p.feed("ink>ok") == ("", "ok")
    assert p.feed("<think> later") == ("", "<think> later")


def test_tool_calls_whole() -> None:
    content, calls = extract_tool_calls("Checking." + CALL + "\n" + CALL)
    assert content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})] * 2
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls)
    assert len({c.id for c in calls}) == 2
    assert extract_tool_calls(CALL)[0] is None


def test_tool_calls_unterminated_and_invalid() -> None:
    assert extract_tool_calls(CALL.removesuffix("</tool_call>"))[1][0].name == "get_weather"
    bad = "<tool_call>{not json}</tool_call>"
    assert extract_tool_calls(bad) == (bad, [])
    assert extract_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []
    assert extract_tool_calls("<tool_call>{oops") == ("", [])  # cut off: dropped, not raw markup
    assert extract_tool_calls("x < y")[0] == "x < y"


def test_tool_arguments_given_as_a_string_stay_verbatim() -> None:
    _, calls = extract_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert calls[0].arguments == '{"a": 1}'


def test_tool_parser_streams_content_before_the_call() -> None:
    p = HermesToolParser()
    assert p.feed("Let me see <tool") == ("Let me see ", [])
    content, calls = p.feed(CALL.removeprefix("<tool"))
    assert content == "" and calls[0].name == "get_weather"


def test_reasoning_then_tool_call() -> None:
    parser = OutputParser(ReasoningParser(), HermesToolParser())
    out = parse_whole(parser, "<think>need weather</think>\n" + CALL)
    assert out.reasoning == "need weather"
    assert out.content == ""
    assert out.tool_calls[0].name == "get_weather"


TEXTS = st.sampled_from([
    "<think>\nplan it\n</think>\n\nHello world", "plain answer with < and > signs",
    "<think>a</think>" + CALL, "Sure." + CALL + "\n" + CALL + "\nDone.", "<tool_call>{broken</tool_call>tail",
    "<think>unfinished", CALL.removesuffix("</tool_call>"), "",
])


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_streamed_equals_whole_however_the_text_is_cut(text: str, cuts: list[int]) -> None:
    whole = parse_whole(OutputParser(ReasoningParser(), HermesToolParser()), text)
    streamed = stream(OutputParser(ReasoningParser(), HermesToolParser()), text, cuts)
    assert (streamed.reasoning, streamed.content) == (whole.reasoning, whole.content)
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="<>/thinkol_ca x{}\"", max_size=60),
       cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_no_text_is_lost_without_tags(text: str, cuts: list[int]) -> None:
    """Without a leading <think> or a well-formed call, every character comes back as content."""
    out = stream(OutputParser(None, HermesToolParser()), text, cuts)
    if not out.tool_calls:
        assert out.content == text
