"""Small tokenizers built locally for tests (nothing downloads).

- ``byte_level_bpe()``: GPT-2 style byte-level BPE. Every byte is a token, so a
  multi-byte character (é, 你, 😀) can be split over several tokens; a few merges
  make whole words and one partial emoji (its first two bytes).
- ``metaspace_bpe()``: SentencePiece / Llama style. Words carry a leading "▁",
  characters outside the small vocabulary fall back to ``<0xNN>`` byte tokens,
  and the decoder strips one leading space, so a token's text depends on its
  neighbours ("▁world" is "world" at the start of a text, " world" after one).

Both are ``PreTrainedTokenizerFast`` with an eos token and no clean-up of
tokenization spaces. They are cached: treat them as read-only.
"""

from __future__ import annotations

import functools
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BYTE_LEVEL_EOS = "<|endoftext|>"
METASPACE_BOS, METASPACE_EOS, METASPACE_UNK = "<s>", "</s>", "<unk>"

# Texts worth round-tripping: ASCII, accents, CJK, emoji (incl. ZWJ sequences).
SAMPLE_TEXTS = [
    "Hello world",
    "the cat and the hat",
    "café au lait, crème brûlée",
    "你好，世界",
    "emoji 😀👍🏽 and family 👨‍👩‍👧",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n",
    "mixed 你好 world 😀 end",
]

_WORDS = ["the", "and", "hello", "world", "in", "er", "at", "cat", "hat"]


def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes map to themselves)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _merges_for(words: list[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Left-to-right merges that build each word (a list of symbols) into one token."""
    merges: list[tuple[str, str]] = []
    for symbols in words:
        left = symbols[0]
        for right in symbols[1:]:
            if left + right not in vocab:
                merges.append((left, right))
                vocab[left + right] = len(vocab)
            left += right
    return merges


@functools.lru_cache(maxsize=1)
def byte_level_bpe() -> PreTrainedTokenizerFast:
    table = byte_to_char()
    vocab = {table[b]: b for b in range(256)}

    def symbols(text: str) -> list[str]:
        return [table[b] for b in text.encode("utf-8")]

    words = [symbols(w) for w in _WORDS] + [symbols(" " + w) for w in _WORDS]
    words += [symbols("é"), symbols("你好"), symbols("😀")[:2]]  # last: half an emoji
    merges = _merges_for(words, vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_LEVEL_EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=BYTE_LEVEL_EOS, clean_up_tokenization_spaces=False
    )


@functools.lru_cache(maxsize=1)
def metaspace_bpe() -> PreTrainedTokenizerFast:
    vocab = {METASPACE_UNK: 0, METASPACE_BOS: 1, METASPACE_EOS: 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁" + string.ascii_letters + string.digits + string.punctuation + "你好世界，":
        vocab[ch] = len(vocab)
    words = [list("▁" + w) for w in _WORDS] + [list(w) for w in _WORDS] + [list("▁你好")]
    merges = _merges_for(words, vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=METASPACE_UNK, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([METASPACE_UNK, METASPACE_BOS, METASPACE_EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=METASPACE_BOS,
        eos_token=METASPACE_EOS,
        unk_token=METASPACE_UNK,
        clean_up_tokenization_spaces=False,
    )


def all_tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    """Every test tokenizer by name, for ``pytest.mark.parametrize``."""
    return {"byte_level_bpe": byte_level_bpe(), "metaspace_bpe": metaspace_bpe()}


def byte_fallback_ids(tokenizer: PreTrainedTokenizerFast) -> set[int]:
    """Ids of ``<0xNN>`` byte-fallback tokens (empty for byte-level BPE)."""
    return {i for tok, i in tokenizer.get_vocab().items() if tok.startswith("<0x") and len(tok) == 6}
