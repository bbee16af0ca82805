"""The input step: one function per request, run once, off the event loop.

``InputProcessor.process`` renders the chat template, checks the prompt's size
by characters *before* tokenizing (a multi-megabyte prompt fails in
milliseconds), tokenizes, and checks the context length and token ids. The
engine core receives only ``ProcessedRequest``s.
"""

from __future__ import annotations

from typing import Any

from loraplex.backend.engine.request import ChatInput, EngineRequest, ProcessedRequest
from loraplex.errors import InvalidRequestError

# A normalizer may drop characters, so a prompt can hold a little more text than
# tokens x longest token; this slack keeps the bound from refusing a prompt that fits.
CHAR_BOUND_SLACK = 2


class InputProcessor:
    """Turns ``EngineRequest``s into ``ProcessedRequest``s with the model's tokenizer (thread-safe)."""

    def __init__(self, tokenizer: Any, model_name: str, max_model_len: int, vocab_size: int):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_prompt_chars = max_model_len * longest_token_chars(tokenizer) * CHAR_BOUND_SLACK

    @property
    def chat_template(self) -> str:
        return str(getattr(self.tokenizer, "chat_template", None) or "")

    def process(self, req: EngineRequest) -> ProcessedRequest:
        """Validated token ids and limits for ``req``; raises InvalidRequestError naming the field."""
        if not req.request_id:
            raise InvalidRequestError("request_id", "must not be empty")
        params = req.params
        params.check_vocab(self.vocab_size)
        prompt_ids = self._prompt_ids(req)
        n = len(prompt_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n
        if n + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds max_model_len="
                f"{self.max_model_len}")
        return ProcessedRequest(req.request_id, prompt_ids, params, max_tokens, req.adapter or None, req.priority,
                                req.arrival_time)

    def _prompt_ids(self, req: EngineRequest) -> list[int]:
        given = sum(x is not None for x in (req.prompt, req.prompt_token_ids, req.chat))
        if given != 1:
            raise InvalidRequestError("prompt", "give exactly one of prompt text, prompt token ids or chat messages")
        if req.prompt_token_ids is not None:
            return self.check_token_ids(req.prompt_token_ids)
        if req.chat is not None:
            return self.encode("chat", self.render_chat(req.chat), add_special_tokens=True)
        assert req.prompt is not None
        return self.encode("prompt", req.prompt, add_special_tokens=True)

    def check_token_ids(self, token_ids: list[int]) -> list[int]:
        ids = list(token_ids)
        if not ids:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        self._check_length("prompt", len(ids))
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad[0]} outside the vocabulary "
                                      f"[0, {self.vocab_size})")
        return ids

    def encode(self, field_name: str, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``; refuses text that cannot fit by its length in characters first."""
        if not text:
            raise InvalidRequestError(field_name, "must not be empty")
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError(field_name, f"{len(text)} characters cannot fit in max_model_len="
                                      f"{self.max_model_len} tokens")
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        self._check_length("prompt", len(ids))
        return ids

    def _check_length(self, field_name: str, n: int) -> None:
        if n >= self.max_model_len:
            raise InvalidRequestError(field_name, f"{n} tokens; must be shorter than max_model_len="
                                      f"{self.max_model_len}")

    def render_chat(self, chat: ChatInput) -> str:
        """The prompt text of ``chat`` with the model's template (as Generate and Tokenize render it)."""
        if not self.chat_template:
            raise InvalidRequestError("messages", f"model {self.model_name!r} has no chat template")
        if not chat.messages:
            raise InvalidRequestError("messages", "must not be empty")
        chars = sum(len(str(m.get("content") or "")) for m in chat.messages)
        if chars > self.max_prompt_chars:
            raise InvalidRequestError("messages", f"{chars} characters of content cannot fit in max_model_len="
                                      f"{self.max_model_len} tokens")
        try:
            return str(self.tokenizer.apply_chat_template(
                chat.messages, tools=chat.tools or None, tokenize=False,
                add_generation_prompt=chat.add_generation_prompt, **(chat.template_kwargs or {})))
        except Exception as exc:  # jinja errors on malformed messages, the template's raise_exception
            raise InvalidRequestError("chat", f"the chat template could not render these messages: {exc}") from exc

    def tokenize(self, prompt: str | None, messages: list[dict[str, Any]] | None, tools: list[dict[str, Any]] | None,
                 template_kwargs: dict[str, Any] | None, add_special_tokens: bool) -> list[int]:
        """Token ids of a text or of chat messages, exactly as Generate would build its prompt."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("prompt", "give exactly one of prompt text or chat messages")
        if messages is not None:
            text = self.render_chat(ChatInput(messages, tools, template_kwargs))
            return self.encode("chat", text, add_special_tokens=True)  # as Generate encodes a chat prompt
        assert prompt is not None
        return self.encode("prompt", prompt, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError("token_ids", f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))


def longest_token_chars(tokenizer: Any) -> int:
    """Characters in the longest vocabulary entry (at least 1): a bound on characters per token."""
    vocab = tokenizer.get_vocab()
    return max([len(token) for token in vocab] + [1])
