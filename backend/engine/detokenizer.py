"""Incremental detokenization: token ids in, text deltas out.

A token's text can depend on its neighbours (SentencePiece drops the leading
space of the first token; byte-level and byte-fallback tokens may each hold a
part of one UTF-8 character), so decoding token by token is wrong. Instead we
decode a small sliding window of ids twice, ``ids[prefix_offset:read_offset]``
(text already emitted) and ``ids[prefix_offset:]`` (the same plus the new ids),
and emit the difference. Text ending in U+FFFD (an unfinished character) is held
back until a later token completes it, or until ``finish()``.

The window starts inside the prompt, so the first output token is decoded in
context: after the prompt "Hi", "▁there" yields " there" (as in vLLM), whereas
``tokenizer.decode(output_ids)`` alone would strip that space.

With a fast (Rust) tokenizer, the per-token path is the tokenizers library's own
``DecodeStream`` primed with the same prompt tail (one call per token, as vLLM's
fast detokenizer does); the window decode above stays for ``finish()`` and for
tokenizers it cannot serve.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens
MAX_EXTRA_CONTEXT_TOKENS = 8  # how far back to look for the start of a character


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas.

    ``push(ids)`` returns the new text; ``text`` is all output text emitted so
    far; ``finish()`` releases text held back for an unfinished character.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = self._prompt_context(prompt_token_ids)
        self._ids = context  # prompt tail + every output id
        self._prefix_offset = 0  # window start
        self._read_offset = len(context)  # ids up to here have been turned into text
        self._num_context = len(context)
        self._prefix_text: str | None = self._decode(0, len(context))
        self._chunks: list[str] = []
        self._fast: Any = getattr(tokenizer, "_tokenizer", None)
        self._stream: Any = None
        if self._fast is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
                # the prompt tail: context, not output. A tail the stream holds back (it ends in U+FFFD)
                # would come out with the first output token: the window path then
                if context and not self._stream.step(self._fast, list(context)):
                    self._stream = None
            except Exception:  # an older tokenizers, or a decoder it cannot stream: the window path
                self._stream = None

    @property
    def text(self) -> str:
        """All output text emitted so far (without text held back)."""
        return "".join(self._chunks)

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def push(self, token_ids: list[int]) -> str:
        """Appends generated ids; returns the text they complete (may be "")."""
        delta = "".join(self._push_one(t) for t in token_ids)
        if delta:
            self._chunks.append(delta)
        return delta

    def push_one(self, token_id: int) -> str:
        """``push([token_id])``, without the list."""
        delta = self._push_one(token_id)
        if delta:
            self._chunks.append(delta)
        return delta

    def finish(self) -> str:
        """Emits whatever is held back (an unfinished character decodes as U+FFFD)."""
        self._stream = None  # nothing more to stream
        window_text = self._decode(self._prefix_offset, len(self._ids))
        delta = window_text[len(self._prefix()) :]
        self._advance(window_text)
        if delta:
            self._chunks.append(delta)
        return delta

    # -- internals ---------------------------------------------------------

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The prompt's tail, moved back so it does not start inside a character.

        A window that starts on a continuation byte decodes it as U+FFFD, and a
        byte-fallback decoder then turns the whole run of byte tokens after it
        into U+FFFD too, swallowing the first output characters.
        """
        end = len(prompt_token_ids)
        start = max(end - PROMPT_CONTEXT_TOKENS, 0)
        lowest = max(start - MAX_EXTRA_CONTEXT_TOKENS, 0)
        while start > lowest and self._decode_ids(prompt_token_ids[start:]).startswith(REPLACEMENT_CHAR):
            start -= 1
        return list(prompt_token_ids[start:])

    def _push_one(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                chunk = self._stream.step(self._fast, token_id)
            except Exception:  # the stream refused this id: the window path from here on
                self._stream = None
            else:
                if not chunk:
                    return ""  # nothing new yet (an unfinished character, or a skipped special token)
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                self._prefix_text = None  # decoded only if the window path needs it
                return str(chunk)
        window_text = self._decode(self._prefix_offset, len(self._ids))
        prefix = self._prefix()
        if len(window_text) <= len(prefix) or window_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or the last character is unfinished
        delta = window_text[len(prefix) :]
        self._advance(window_text)
        return delta

    def _prefix(self) -> str:
        """The window's text already emitted (``ids[prefix_offset:read_offset]``)."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return self._prefix_text

    def _advance(self, window_text: str) -> None:
        """Slides the window: emitted ids become the next step's prefix."""
        if len(window_text) <= len(self._prefix()):
            return
        old_read = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_offset = old_read
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def _decode(self, start: int, end: int) -> str:
        return self._decode_ids(self._ids[start:end])

    def _decode_ids(self, token_ids: list[int]) -> str:
        fast = getattr(self.tokenizer, "_tokenizer", None)  # the Rust tokenizer: no per-call Python wrapping
        if fast is not None:
            return str(fast.decode(token_ids, skip_special_tokens=self.skip_special_tokens))
        text = self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)
        return text
