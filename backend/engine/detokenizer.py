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
"""

from __future__ import annotations

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
        self._prefix_text = self._decode(0, len(context))
        self._chunks: list[str] = []

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

    def finish(self) -> str:
        """Emits whatever is held back (an unfinished character decodes as U+FFFD)."""
        window_text = self._decode(self._prefix_offset, len(self._ids))
        delta = window_text[len(self._prefix_text) :]
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
        window_text = self._decode(self._prefix_offset, len(self._ids))
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or the last character is unfinished
        delta = window_text[len(self._prefix_text) :]
        self._advance(window_text)
        return delta

    def _advance(self, window_text: str) -> None:
        """Slides the window: emitted ids become the next step's prefix."""
        if len(window_text) <= len(self._prefix_text):
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
