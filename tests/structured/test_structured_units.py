"""The pieces of structured output (the bitmask op: tests/kernels/test_bitmask.py): choice escaping, the compile cache, the
matcher bookkeeping, typed errors for bad constraints, and how a constrained request ends."""

from __future__ import annotations

import json
import re

import pytest

from loraplex import LLM, SamplingParams
from loraplex.backend.demo import DEMO_MODEL_DIR
from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.engine.structured import StructuredOutputs
from loraplex.backend.sampling_params import StructuredOutputsParams
from loraplex.errors import InvalidRequestError
from tests.engine_factory import assert_no_leaks

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(), reason="demo model not built")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


def test_choice_escapes_quotes_backslashes_newlines_and_unicode(llm: LLM) -> None:
    choices = ['say "hi"', "back\\slash", "two\nlines", "café ☕", "{}"]
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=24, structured_outputs={"choice": choices})
    outs = llm.generate([_chat(llm, "Hello")] * 10, params)
    assert all(o.text in choices and o.finish_reason == "stop" for o in outs), [o.text for o in outs]


def test_compiled_grammars_are_cached_by_content_in_an_lru(llm: LLM) -> None:
    so = StructuredOutputs(llm.tokenizer, llm.engine.vocab_size, llm.engine.eos_ids, cache_entries=2)
    a = StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}})
    same = StructuredOutputsParams(json=json.dumps({"properties": {"x": {"type": "integer"}}, "type": "object"}))
    first = so.compile(a)
    assert so.compile(same) is first  # same content, other key order: one compilation
    so.compile(StructuredOutputsParams(regex="a+"))
    so.compile(StructuredOutputsParams(regex="b+"))  # evicts the least recently used: the schema
    assert so.compile(a) is not first


def test_the_matcher_accepts_each_output_token_once(llm: LLM) -> None:
    so = llm.engine.structured
    grammar = so.request_grammar(SamplingParams(structured_outputs={"regex": "ab+c"}))
    assert grammar is not None
    tokens = llm.tokenizer.encode("abbc", add_special_tokens=False)
    grammar.advance(tokens[:2])
    grammar.advance(tokens[:2])  # again, e.g. after a preemption: nothing is accepted twice
    grammar.advance(tokens)
    assert grammar.num_accepted == len(tokens) and grammar.rejected is None
    grammar.advance([*tokens, tokens[0]])  # "abbca" leaves the language
    assert grammar.rejected == tokens[0]


BAD = [
    ({"json": {"type": "foo"}}, "structured_outputs.json", "Unsupported type"),
    ({"json": '{"type": "object",'}, "structured_outputs.json", "not valid JSON"),
    ({"json": "[1, 2]"}, "structured_outputs.json", "JSON object"),
    ({"regex": "([a-z"}, "structured_outputs.regex", "Unclosed"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar", "not defined"),
    ({"grammar": ""}, "structured_outputs.grammar", "empty"),
    ({"choice": []}, "structured_outputs.choice", "1 to"),
    ({"structural_tag": "{}"}, "structured_outputs.structural_tag", "cannot be compiled"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs", "exactly one"),
]


@pytest.mark.parametrize(("spec", "field", "words"), BAD)
def test_bad_constraints_are_typed_errors_naming_the_field_before_any_work(llm: LLM, spec, field, words) -> None:
    with pytest.raises(InvalidRequestError) as info:
        params = SamplingParams(max_tokens=8, structured_outputs=spec)
        llm.engine.make_sequence(EngineRequest("bad", prompt="hi", params=params, adapter="upper"))
    assert info.value.field == field and words in info.value.message, info.value.message
    assert_no_leaks(llm.engine)  # the adapter was not pinned, nothing queued


def test_a_completed_grammar_ends_the_request_even_with_ignore_eos(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, min_tokens=20,
                            structured_outputs={"choice": ["yes", "no"]})
    [out] = llm.generate([_chat(llm, "Hello world")], params)
    assert out.text in ("yes", "no") and out.finish_reason == "stop" and len(out.token_ids) <= 4


def test_a_constraint_cut_by_max_tokens_is_a_valid_prefix(llm: LLM) -> None:
    [out] = llm.generate([_chat(llm, "Hello world")],
                         SamplingParams(temperature=0, max_tokens=6, structured_outputs={"regex": "[a-z]{20}"}))
    assert out.finish_reason == "length" and out.text.isalpha() and out.text.islower() and len(out.text) == 6


def test_grammar_and_json_object_in_one_batch_with_adapters(llm: LLM) -> None:
    gbnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
    specs = [{"grammar": gbnf}, {"json_object": True}, None]
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=s) for s in specs]
    prompts = [_chat(llm, "abc 123"), _chat(llm, "Paris"), _chat(llm, "Hello world")]
    outs = llm.generate(prompts, params, adapters=["reverse", "tools", "upper"])
    complete = outs[0].finish_reason == "stop"
    assert re.fullmatch(r"\((\d+,)*\d+\)" if complete else r"\((\d+,?)*", outs[0].text), outs[0].text
    assert isinstance(json.loads(outs[1].text), dict)
    assert outs[2].text == "HELLO WORLD"


def _chat(llm: LLM, text: str) -> str:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def test_length_bounded_strings_never_take_raw_control_characters(llm: LLM) -> None:
    # xgrammar 0.2 lets them into a string with minLength/maxLength; the engine adds a pattern
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 4}},
              "required": ["s"]}
    grammar = llm.engine.structured.request_grammar(SamplingParams(structured_outputs={"json": schema}))
    assert grammar is not None
    prefix = llm.tokenizer.encode('{"s": "a', add_special_tokens=False)
    grammar.advance(prefix)
    assert grammar.rejected is None
    grammar.advance([*prefix, 0x0F])  # the byte-level token of the control byte 0x0f
    assert grammar.rejected == 0x0F
