"""OpenAI request bodies, validated: every bound is checked here, before any gRPC call.

Out-of-range values become HTTP 400 naming the field (``param``); unknown fields are
ignored, as vLLM does, so clients that send newer OpenAI fields keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loraplex.gateway.errors import OpenAIError, bad_request
from loraplex.gateway.structured import StructuredFields
from loraplex.gateway.unsupported import CHAT, COMPLETIONS, refuse_unsupported

MAX_STOP_CHARS = 256  # a sanity bound; the counts the backend allows come from GetServerInfo.limits
MAX_N = 128
ROLES = ("system", "developer", "user", "assistant", "tool")

UINT32 = 2**32 - 1
INT32 = 2**31 - 1
Float = Annotated[float, Field(allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request, StructuredFields):
    """The sampling and stopping fields both endpoints share (OpenAI names plus vLLM extras);
    the structured-output ones (``response_format``, ``structured_outputs``...) in gateway.structured."""

    model: str = Field(min_length=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, le=INT32)
    min_p: Float | None = Field(None, ge=0, le=1)
    repetition_penalty: Float | None = Field(None, gt=0, le=2)
    min_tokens: int = Field(0, ge=0, le=UINT32)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=UINT32)]] | None = Field(None, max_length=64)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool | None = None
    priority: int = Field(0, ge=-INT32 - 1, le=INT32)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        for s in stops:
            if not s:
                raise ValueError("stop sequences must not be empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence is at most {MAX_STOP_CHARS} characters, got {len(s)}")
        return stops

    @model_validator(mode="after")
    def _check_common(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              "stream_options")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server.", "logit_bias", "unsupported_value")
        return self

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # the validator made it a list

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def num_choices(self) -> int:
        """How many backend calls the request fans out into."""
        return self.n

    def logprobs_asked(self) -> tuple[int | None, str]:
        """(alternatives per token asked for, or None; the field that asks)."""
        return None, "logprobs"


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1, le=UINT32)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("token-id prompts must not be empty")
        flat = [t for p in value for t in (p if isinstance(p, list) else [p])] if isinstance(value, list) else []
        if any(isinstance(t, int) and not 0 <= t <= UINT32 for t in flat):
            raise ValueError("token ids must be in [0, 2^32)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        refuse_unsupported(data, COMPLETIONS)
        return data

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise bad_request("suffix is not supported by this server.", "suffix", "unsupported_value")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of must equal n (or be left out).", "best_of")
        return self

    def num_choices(self) -> int:
        return len(self.prompts()) * self.n

    def logprobs_asked(self) -> tuple[int | None, str]:
        return self.logprobs, "logprobs"

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class CalledFunction(_Request):
    name: str
    arguments: str = ""


class MessageToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value not in ROLES:
            supported = ", ".join(f"'{r}'" for r in ROLES)
            raise ValueError(f"Invalid value: '{value}'. Supported values are: {supported}.")
        return value

    @field_validator("content")
    @classmethod
    def _check_parts(cls, value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(value, list):
            for part in value:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part of type '{part.get('type')}' is not supported; "
                                     "only 'text' parts are")
        return value

    @model_validator(mode="after")
    def _check_shape(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs content")
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs tool_call_id")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=UINT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        refuse_unsupported(data, CHAT)
        return data

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        self._check_tool_choice()
        return self

    def _check_tool_choice(self) -> None:
        choice = self.tool_choice
        if choice is None or choice == "none":
            return
        if not self.tools:
            raise bad_request("Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                              "'tools' are specified.", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names():
            raise bad_request(f"tool_choice names function '{choice.function.name}', which is not in "
                              "'tools'.", "tool_choice.function.name")

    def logprobs_asked(self) -> tuple[int | None, str]:
        return self.top_logprobs, "top_logprobs"

    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or []]

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        """The backend's ``logprobs`` (alternatives per token), or None when not asked."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def tools_for_template(self) -> list[Tool]:
        """The tools the chat template sees: none for "none", only the named one for a named choice."""
        if not self.tools or self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function.name]
        return list(self.tools)


class LoadLoraAdapterRequest(_Request):
    """vLLM's ``POST /v1/load_lora_adapter`` body (``load_inplace`` reloads as a new version)."""

    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False
    pin: bool = False


class UnloadLoraAdapterRequest(_Request):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    lora_name: str = ""
    lora_int_id: int | None = None


__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "LoadLoraAdapterRequest",
    "OpenAIError",
    "UnloadLoraAdapterRequest",
]
