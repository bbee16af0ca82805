"""IncrementalDetokenizer: the deltas add up to what ``tokenizer.decode`` gives."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase

from loraplex.backend.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from tests.tokenizers_factory import SAMPLE_TEXTS, all_tokenizers, byte_fallback_ids

TOKENIZERS = all_tokenizers()
NAMES = sorted(TOKENIZERS)
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that stress the tokenizers: spaces, accents, CJK, emoji, ZWJ, modifiers.
_INTERESTING = list(" \n\tabcthe.,éü你好世界，😀👍🏽👨\u200d👩🇫🇷") + ["the", " world", " hello", "▁"]
TEXTS = st.lists(
    st.one_of(st.sampled_from(_INTERESTING), st.characters(exclude_categories=["Cs"])), max_size=30
).map("".join)


def run(detok: IncrementalDetokenizer, ids: list[int], cuts: list[int]) -> list[str]:
    """Pushes ``ids`` in chunks split at ``cuts``; returns the deltas."""
    bounds = [0, *sorted(c % (len(ids) + 1) for c in cuts), len(ids)]
    return [detok.push(ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def check(detok: IncrementalDetokenizer, deltas: list[str], truth: str) -> None:
    """Deltas equal ``truth`` once it ends on a finished character; with ``finish()``, always."""
    if not truth.endswith(REPLACEMENT_CHAR):
        assert "".join(deltas) == truth
    assert "".join(deltas) + detok.finish() == truth
    assert detok.text == truth


def decode(tok: PreTrainedTokenizerBase, ids: list[int], skip: bool = True) -> str:
    text = tok.decode(ids, skip_special_tokens=skip)
    assert isinstance(text, str)
    return text


def expected_continuation(tok: PreTrainedTokenizerBase, prompt_ids: list[int], output_ids: list[int]) -> str:
    """The output's text in the prompt's context: decode(prompt + output) minus decode(prompt)."""
    full, prompt = decode(tok, prompt_ids + output_ids), decode(tok, prompt_ids)
    assert full.startswith(prompt)
    return full[len(prompt) :]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_sample_texts_token_by_token(name: str, text: str) -> None:
    tok = TOKENIZERS[name]
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.push([i]) for i in ids]
    assert "".join(deltas) == decode(tok, ids)
    assert detok.text == "".join(deltas)
    assert detok.finish() == ""
    assert not any(d.endswith(REPLACEMENT_CHAR) for d in deltas)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("skip", [True, False])
@HYPOTHESIS
@given(text=TEXTS, cuts=st.lists(st.integers(0, 10**6), max_size=6), with_eos=st.booleans())
def test_random_text_deltas_match_decode(
    name: str, skip: bool, text: str, cuts: list[int], with_eos: bool
) -> None:
    tok = TOKENIZERS[name]
    ids = tok.encode(text) + ([tok.eos_token_id] if with_eos else [])
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    check(detok, run(detok, ids, cuts), decode(tok, ids, skip))


@pytest.mark.parametrize("name", NAMES)
@HYPOTHESIS
@given(prompt=TEXTS, text=TEXTS, cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_random_text_after_prompt_is_decoded_in_context(
    name: str, prompt: str, text: str, cuts: list[int]
) -> None:
    tok = TOKENIZERS[name]
    prompt_ids, ids = tok.encode(prompt), tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    check(detok, run(detok, ids, cuts), expected_continuation(tok, prompt_ids, ids))


def _token_ids(name: str) -> st.SearchStrategy[list[int]]:
    """Random ids; for byte fallback, no <0xNN> tokens (random bytes there can rewrite earlier text)."""
    tok = TOKENIZERS[name]
    allowed = sorted(set(range(len(tok))) - byte_fallback_ids(tok))
    return st.lists(st.sampled_from(allowed), max_size=40)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("skip", [True, False])
@HYPOTHESIS
@given(data=st.data(), cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_random_token_ids_match_decode(name: str, skip: bool, data: st.DataObject, cuts: list[int]) -> None:
    tok = TOKENIZERS[name]
    ids = data.draw(_token_ids(name))
    truth = decode(tok, ids, skip)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    check(detok, run(detok, ids, cuts), truth)


def test_split_emoji_is_held_back_until_complete() -> None:
    tok = TOKENIZERS["byte_level_bpe"]
    ids = tok.encode("a😀")
    assert len(ids) >= 3  # "a", then the emoji in pieces
    detok = IncrementalDetokenizer(tok, [])
    assert detok.push(ids[:1]) == "a"
    assert [detok.push([i]) for i in ids[1:-1]] == [""] * (len(ids) - 2)
    assert detok.push(ids[-1:]) == "😀"


def test_finish_flushes_an_unfinished_character() -> None:
    tok = TOKENIZERS["metaspace_bpe"]
    ids = tok.encode("x😀")
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.push([i]) for i in ids[:-1]) == "x"
    assert detok.finish() == tok.decode(ids[:-1])[1:]
    assert detok.finish() == ""


def test_metaspace_keeps_the_space_after_a_prompt() -> None:
    tok = TOKENIZERS["metaspace_bpe"]
    prompt, out = tok.encode("say hello"), tok.encode("the world")
    assert tok.decode(out) == "the world"  # alone, the leading space is stripped
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.push(out) == " the world"
    assert IncrementalDetokenizer(tok, []).push(out) == "the world"


@pytest.mark.parametrize("name", NAMES)
def test_prompt_ending_inside_byte_run(name: str) -> None:
    tok = TOKENIZERS[name]
    prompt, out = tok.encode("aé😀👍🏽"), tok.encode("é😀 ok")
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(detok.push([i]) for i in out) == expected_continuation(tok, prompt, out)


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens(name: str) -> None:
    tok = TOKENIZERS[name]
    ids = [*tok.encode("the cat"), tok.eos_token_id, *tok.encode(" and")]
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(skipped.push([i]) for i in ids) == decode(tok, ids)
    assert tok.eos_token in "".join(kept.push([i]) for i in ids)
    assert kept.output_token_ids == ids
