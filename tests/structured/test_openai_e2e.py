"""Over a real gateway and backend (demo model), with the official ``openai`` SDK: response_format
json_schema and json_object, ``chat.completions.parse`` with pydantic models, vLLM's
``structured_outputs`` and ``guided_*`` extras, forced tool calls (``tool_choice`` "required" and
named), undeclared functions under "auto", cut-off calls, and 400s that name the field."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import jsonschema
import openai
import pytest
from e2e_stack import Stack
from pydantic import BaseModel, Field

from loraplex.backend.demo import DEMO_MODEL_DIR, WEATHER_TOOL

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(), reason="demo model not built")

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 64}
CALLS: dict[str, Any] = {"temperature": 0, "max_tokens": 128}  # the call markup alone is ~50 byte tokens
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "hour24": {"type": "boolean"}},
                   "required": ["city", "hour24"], "additionalProperties": False}}}
# the base model and the echoing adapters never close an unbounded string: bound the city
WEATHER = {"type": "function", "function": {**WEATHER_TOOL["function"], "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}
TOOLS = [WEATHER, TIME_TOOL]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Answer(BaseModel):
    word: str = Field(max_length=6)
    count: int = Field(ge=0, le=99)
    mood: Literal["happy", "sad"]
    done: bool


def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def user(text: str = "Hello world") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_response_format_json_schema_and_json_object(stack: Stack) -> None:
    schema = Answer.model_json_schema()
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    client = oai(stack)
    for model in ("loraplex-demo", "upper"):
        reply = client.chat.completions.create(model=model, messages=user(), response_format=rf, **GREEDY)
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
        assert reply.choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(model="tools", messages=user("Paris"),
                                           response_format={"type": "json_object"}, **GREEDY)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("model", ["loraplex-demo", "reverse"])
def test_parse_with_a_pydantic_model_returns_the_parsed_object(stack: Stack, model: str) -> None:
    client = oai(stack)
    completion = client.chat.completions.parse(model=model, messages=user(), response_format=Answer, **GREEDY)
    assert isinstance(completion.choices[0].message.parsed, Answer)
    beta = getattr(getattr(client, "beta", None), "chat", None)
    if beta is not None and hasattr(beta.completions, "parse"):
        again = beta.completions.parse(model=model, messages=user(), response_format=Answer, **GREEDY)
        assert again.choices[0].message.parsed == completion.choices[0].message.parsed


def test_streamed_json_schema_validates(stack: Stack) -> None:
    schema = Answer.model_json_schema()
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    stream = oai(stack).chat.completions.create(model="reverse", messages=user(), response_format=rf, stream=True,
                                                temperature=1, seed=5, max_tokens=64)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_vllm_structured_outputs_and_guided_aliases(stack: Stack) -> None:
    client = oai(stack)
    cases = [
        ({"structured_outputs": {"regex": r"[A-Z]{2,5}-\d{2}"}}, lambda t: re.fullmatch(r"[A-Z]{2,5}-\d{2}", t)),
        ({"structured_outputs": {"choice": ["alpha", "beta"]}}, lambda t: t in ("alpha", "beta")),
        ({"structured_outputs": {"grammar": 'root ::= ("yes" | "no") "!"'}}, lambda t: t in ("yes!", "no!")),
        ({"structured_outputs": {"json": SCHEMAS["get_time"]}},
         lambda t: jsonschema.validate(json.loads(t), SCHEMAS["get_time"])),
        ({"guided_regex": r"\d{3}"}, lambda t: re.fullmatch(r"\d{3}", t)),
        ({"guided_choice": ["x", "y z"]}, lambda t: t in ("x", "y z")),
        ({"guided_json": SCHEMAS["get_time"]}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS["get_time"])),
    ]
    for extra, check in cases:
        reply = client.chat.completions.create(model="upper", messages=user(), extra_body=extra, **GREEDY)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop" and check(text) is not False, (extra, text)
    done = client.completions.create(model="reverse", prompt="Hello", extra_body={"guided_choice": ["one", "two"]},
                                     **GREEDY)
    assert done.choices[0].text in ("one", "two")


@pytest.mark.parametrize("model", ["loraplex-demo", "tools", "upper"])
def test_tool_choice_required_and_named_force_valid_calls(stack: Stack, model: str) -> None:
    client = oai(stack)
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice in ("required", named):
        # one call: the echoing models would go on calling until max_tokens
        reply = client.chat.completions.create(model=model, messages=user("Paris"), tools=TOOLS, tool_choice=choice,
                                               parallel_tool_calls=False, **CALLS)
        message = reply.choices[0].message
        assert message.tool_calls and len(message.tool_calls) == 1, (choice, message)
        for call in message.tool_calls:
            assert call.function.name in SCHEMAS
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            if choice == named:
                assert call.function.name == "get_time"
        assert reply.choices[0].finish_reason == "tool_calls"


def test_streamed_forced_tool_call(stack: Stack) -> None:
    stream = oai(stack).chat.completions.create(model="upper", messages=user("Paris"), tools=TOOLS, stream=True,
                                                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                **CALLS)
    calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS["get_weather"])


def test_auto_never_returns_a_call_to_an_undeclared_function(stack: Stack) -> None:
    # the `tools` adapter always calls get_weather; here only get_time is declared
    reply = oai(stack).chat.completions.create(model="tools", messages=user("Paris"), tools=[TIME_TOOL],
                                               tool_choice="auto", **CALLS)
    message = reply.choices[0].message
    assert not message.tool_calls
    assert "get_weather" in message.content and reply.choices[0].finish_reason == "stop"


def test_a_tool_call_cut_by_max_tokens_is_not_raw_markup(stack: Stack) -> None:
    reply = oai(stack).chat.completions.create(model="tools", messages=user("Paris"), tools=[WEATHER_TOOL],
                                               temperature=0, max_tokens=6)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "length" and not message.tool_calls
    assert "<tool_call>" not in (message.content or "")


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"extra_body": {"structured_outputs": {"regex": "(a"}}}, "structured_outputs.regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= nothing"}}}, "structured_outputs.grammar"),
    ({"extra_body": {"structured_outputs": {}}}, "structured_outputs"),
    ({"extra_body": {"guided_regex": "[z-a]"}}, "guided_regex"),
    ({"extra_body": {"guided_choice": ["a"], "guided_regex": "a"}}, "guided_choice"),  # the second one named
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
]


@pytest.mark.parametrize(("kwargs", "param"), BAD)
def test_bad_constraints_are_400_naming_the_field(stack: Stack, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai(stack).chat.completions.create(model="upper", messages=user(), **kwargs, **GREEDY)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param, info.value.body
