"""LangChain (langchain-openai) against a real gateway and backend (demo model):
``with_structured_output`` with json_schema, json_mode and function_calling, and
``bind_tools(tool_choice="any")``."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from e2e_stack import Stack
from pydantic import BaseModel, Field

from loraplex.backend.demo import DEMO_MODEL_DIR

langchain_openai = pytest.importorskip("langchain_openai")
pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(), reason="demo model not built")


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=10)
    sunny: bool
    unit: Literal["C", "F"]


def chat_model(stack: Stack, model: str, **kwargs: Any) -> Any:
    return langchain_openai.ChatOpenAI(model=model, base_url=stack.url + "/v1", api_key="unused", temperature=0,
                                       max_tokens=128, max_retries=0, timeout=120, **kwargs)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_pydantic_object(stack: Stack, method: str) -> None:
    for model in ("loraplex-demo", "upper"):
        structured = chat_model(stack, model).with_structured_output(Weather, method=method)
        result = structured.invoke("Paris")
        assert isinstance(result, Weather), (model, method, result)


def test_with_structured_output_json_mode(stack: Stack) -> None:
    schema = {"title": "anything", "description": "any JSON object", "type": "object"}
    # the `tools` adapter closes its JSON objects; the echoing ones run to max_tokens in a string
    result = chat_model(stack, "tools").with_structured_output(schema, method="json_mode").invoke("Paris")
    assert isinstance(result, dict) and result


def test_bind_tools_with_tool_choice_any_forces_a_declared_call(stack: Stack) -> None:
    def get_time(city: str) -> str:
        """The local time in a city."""
        return "12:00"

    llm = chat_model(stack, "upper", model_kwargs={"parallel_tool_calls": False})
    message = llm.bind_tools([Weather, get_time], tool_choice="any").invoke("Paris")
    assert len(message.tool_calls) == 1, message
    call = message.tool_calls[0]
    assert call["name"] in ("Weather", "get_time")
    if call["name"] == "Weather":
        Weather.model_validate(call["args"])
    else:
        assert isinstance(call["args"]["city"], str)
