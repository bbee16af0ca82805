"""Structured output on the OpenAI API → the backend's ``StructuredOutput`` constraint.

Sources, at most one per request (two are a 400 naming the second):
- OpenAI ``response_format``: ``text``, ``json_object``, ``json_schema`` (``strict`` or not, the
  output is constrained to the schema either way);
- vLLM's ``structured_outputs`` (``json``, ``json_object``, ``regex``, ``choice``, ``grammar``,
  ``structural_tag``) and its older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
  ``guided_grammar`` fields;
- chat ``tool_choice`` ``"required"`` or a named function: the output is one or more hermes tool
  calls (``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``, the markup the chat
  templates of Qwen/Hermes models and of the demo model use) to declared tools, each call's
  ``arguments`` constrained by that tool's ``parameters`` schema.

The backend compiles the constraint; its INVALID_ARGUMENT is relabelled with the field the
client set (``relabel_errors``). With ``tool_choice`` ``"auto"``, a call to a function the client
did not declare is returned as content, never as a tool call (``DeclaredToolParser``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraplex.clients import pb
from loraplex.gateway.errors import OpenAIError, bad_request
from loraplex.gateway.tool_parser import CALL_END, CALL_START, HermesToolParser, ParsedToolCall

BACKEND_FIELD = "params.structured_output"
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class JsonSchemaFormat(_Body):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise bad_request("response_format of type 'json_schema' needs a 'json_schema' object.",
                              "response_format.json_schema")
        return self


class StructuredOutputsBody(_Body):
    """vLLM's ``structured_outputs`` extra (set one field)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None


class StructuredFields(_Body):
    """The request fields that ask for structured output (both endpoints)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


@dataclass
class Constraint:
    """One request's constraint and the request field it came from (errors name that field)."""

    message: pb.StructuredOutput
    param: str


def constraint_of(req: StructuredFields) -> Constraint | None:
    """The constraint the body's structured-output fields ask for; 400 when it asks for two."""
    found = [c for c in (_from_response_format(req), *_from_structured_outputs(req), *_from_guided(req)) if c]
    if len(found) > 1:
        raise bad_request(f"'{found[1].param}' cannot be combined with '{found[0].param}': give one "
                          "structured-output constraint.", found[1].param)
    return found[0] if found else None


def chat_constraint(req: Any) -> Constraint | None:
    """``constraint_of`` plus the forced tool calls of ``tool_choice`` "required" or named."""
    body = constraint_of(req)
    tools = _forced_tool_call(req)
    if tools is None and getattr(req, "parallel_tool_calls", None) is False and getattr(req, "tools", None):
        raise bad_request("'parallel_tool_calls' = False is honoured when a call is forced (tool_choice "
                          "'required' or a named function); under 'auto' the model may call several tools.",
                          "parallel_tool_calls")
    if tools is not None and body is not None:
        raise bad_request(f"tool_choice '{_choice_label(req.tool_choice)}' forces a tool call; it cannot be "
                          f"combined with '{body.param}'.", body.param)
    return tools or body


def constrain(requests: list[pb.GenerateRequest], constraint: Constraint | None) -> list[pb.GenerateRequest]:
    """Sets the constraint on every backend request (one per choice)."""
    if constraint is not None:
        for r in requests:
            r.params.structured_output.CopyFrom(constraint.message)
    return requests


@contextmanager
def relabel_errors(constraint: Constraint | None) -> Iterator[None]:
    """The backend names its own field (``params.structured_output.regex``); the client gets its own."""
    try:
        yield
    except OpenAIError as err:
        if constraint is not None and err.param and err.param.startswith(BACKEND_FIELD):
            err.message = constraint.param + err.message[len(err.param):]
            err.param = constraint.param
        raise


# ---- sources -----------------------------------------------------------------------------------


def _from_response_format(req: StructuredFields) -> Constraint | None:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return Constraint(pb.StructuredOutput(json_object=True), "response_format")
    assert rf.json_schema is not None
    return _json_schema(rf.json_schema.schema_, "response_format.json_schema.schema")


def _from_structured_outputs(req: StructuredFields) -> list[Constraint]:
    so = req.structured_outputs
    if so is None:
        return []
    out = []
    if so.json_ is not None:
        out.append(_json_schema(so.json_, "structured_outputs.json"))
    if so.json_object:
        out.append(Constraint(pb.StructuredOutput(json_object=True), "structured_outputs.json_object"))
    for name in ("regex", "grammar", "structural_tag"):
        if getattr(so, name) is not None:
            out.append(Constraint(pb.StructuredOutput(**{name: getattr(so, name)}), f"structured_outputs.{name}"))
    if so.choice is not None:
        out.append(_choice(so.choice, "structured_outputs.choice"))
    if not out:
        raise bad_request("structured_outputs needs one of json, json_object, regex, choice, grammar, "
                          "structural_tag.", "structured_outputs")
    return out


def _from_guided(req: StructuredFields) -> list[Constraint]:
    out = []
    for field_name, kind in _GUIDED.items():
        value = getattr(req, field_name)
        if value is None:
            continue
        if kind == "json":
            out.append(_json_schema(value, field_name))
        elif kind == "choice":
            out.append(_choice(value, field_name))
        else:
            out.append(Constraint(pb.StructuredOutput(**{kind: value}), field_name))
    return out


def _json_schema(schema: dict[str, Any] | str, param: str) -> Constraint:
    text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
    return Constraint(pb.StructuredOutput(json_schema=text), param)


def _choice(values: list[str], param: str) -> Constraint:
    return Constraint(pb.StructuredOutput(choice=pb.Choice(values=values)), param)


# ---- tools -------------------------------------------------------------------------------------


def _forced_tool_call(req: Any) -> Constraint | None:
    choice = req.tool_choice
    if not req.tools or choice in (None, "none", "auto"):
        return None
    if choice == "required":
        tools, single = req.tools, req.parallel_tool_calls is False
    else:
        tools, single = [t for t in req.tools if t.function.name == choice.function.name], True
    tag = tool_calls_tag([(t.function.name, t.function.parameters) for t in tools], single)
    return Constraint(pb.StructuredOutput(structural_tag=tag), "tools")


def tool_calls_tag(tools: list[tuple[str, dict[str, Any] | None]], single: bool) -> str:
    """xgrammar's structural tag for one (``single``) or more hermes tool calls to ``tools``,
    written exactly as the chat templates write them."""
    tags = [{"type": "tag",
             "begin": f'{CALL_START}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": ',
             "content": {"type": "json_schema", "json_schema": params or {"type": "object"}},
             "end": "}\n" + CALL_END} for name, params in tools]
    fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
           "stop_after_first": single}
    return json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)


def _choice_label(choice: Any) -> str:
    return choice if isinstance(choice, str) else choice.function.name


class DeclaredToolParser(HermesToolParser):
    """A hermes parser whose calls to undeclared functions come back as content, unchanged in
    substance (``<tool_call>`` markup), as vLLM does; only declared functions are tool calls."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self._names = set(names)

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        return self._declared(*super().feed(text))

    def flush(self) -> tuple[str, list[ParsedToolCall]]:
        return self._declared(*super().flush())

    def _declared(self, content: str, calls: list[ParsedToolCall]) -> tuple[str, list[ParsedToolCall]]:
        undeclared = [c for c in calls if c.name not in self._names]
        for call in undeclared:
            self.calls.remove(call)
            content += f'{CALL_START}\n{{"name": {json.dumps(call.name)}, "arguments": {call.arguments}}}\n{CALL_END}'
        return content, [c for c in calls if c.name in self._names]


def declared_only(parser: HermesToolParser | None, names: list[str]) -> HermesToolParser | None:
    """The tool parser for a chat request: none when tools are off, else one that keeps only
    calls to the declared ``names``."""
    return None if parser is None else DeclaredToolParser(names)
