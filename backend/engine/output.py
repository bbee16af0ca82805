"""Per-request output state: detokenizing, stop conditions, and the deltas handed out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from loraplex.backend.engine.detokenizer import IncrementalDetokenizer
from loraplex.backend.engine.sequence import Sequence
from loraplex.backend.engine.stop import StopStringMatcher
from loraplex.backend.outputs import Logprob, RequestOutput, RequestTimings, Usage


@dataclass
class OutputState:
    detok: IncrementalDetokenizer
    matcher: StopStringMatcher | None
    prompt_logprobs: list[Logprob | None] | None = None
    prompt_logprobs_sent: bool = False
    # final-only (vLLM's RequestOutputKind.FINAL_ONLY, what LLM.generate asks for): the text and
    # logprobs of tokens not handed out yet; no per-token output, one output with everything at the end
    held_text: list[str] | None = None
    held_logprobs: list[Logprob] | None = None

    @classmethod
    def create(cls, seq: Sequence, tokenizer: Any, eos_ids: set[int] | None = None,
               final_only: bool = False) -> OutputState:
        p = seq.params
        matcher = StopStringMatcher(p.stop, p.include_stop_str_in_output) if p.stop else None
        state = cls(IncrementalDetokenizer(tokenizer, seq.prompt_token_ids, p.skip_special_tokens), matcher)
        if final_only:
            state.held_text, state.held_logprobs = [], []
        if p.min_tokens:
            eos = eos_ids if eos_ids is not None else {tokenizer.eos_token_id} - {None}
            seq.early_stop_ids = sorted((set() if p.ignore_eos else set(eos)) | set(p.stop_token_ids))
        if p.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        return state


def append_token(seq: Sequence, token: int, logprob: Logprob | None, eos_ids: set[int],
                 max_model_len: int) -> RequestOutput | None:
    """Appends one sampled token, checks every stop condition, returns the delta (None while a
    final-only request goes on)."""
    state: OutputState = seq.state
    now = time.monotonic()
    seq.output_token_ids.append(token)
    if not seq.timings.first_token:
        seq.timings.first_token = now
    seq.timings.last_token = now
    p = seq.params
    n = len(seq.output_token_ids)
    finish: str | None = None
    stop_reason: int | str | None = None
    can_stop = n >= p.min_tokens
    if can_stop and not p.ignore_eos and token in eos_ids:
        finish = "stop"
    elif can_stop and token in p.stop_token_ids:
        finish, stop_reason = "stop", token
    text = state.detok.push_one(token)
    if state.matcher is not None:
        text, matched = state.matcher.push(text)
        if matched is not None and finish is None and can_stop:
            finish, stop_reason = "stop", matched
    if finish is None and (n >= seq.max_tokens or len(seq.prompt_token_ids) + n + seq.num_pending >= max_model_len):
        finish = "length"
    if finish is not None and not isinstance(stop_reason, str):
        text += flush_text(state)
    if finish is None and state.held_text is not None:
        state.held_text.append(text)
        if logprob is not None:
            state.held_logprobs.append(logprob)  # type: ignore[union-attr]
        return None
    return make_output(seq, [token], text, [logprob] if logprob is not None else None, finish, stop_reason)


def flush_text(state: OutputState) -> str:
    """Text held back (incomplete characters, possible stop-string prefixes) released at the end."""
    text = state.detok.finish()
    if state.matcher is not None:
        emitted, _ = state.matcher.push(text)
        text = emitted + state.matcher.flush()
    return text


def _copy_timings(t: RequestTimings) -> RequestTimings:
    """A snapshot (the sequence's own keeps moving); ~10x cheaper than copy.copy."""
    return RequestTimings(t.arrival, t.first_scheduled, t.first_token, t.last_token, t.finished)


def make_output(seq: Sequence, token_ids: list[int], text: str, logprobs: list[Logprob] | None,
                finish: str | None, stop_reason: int | str | None = None, error: str | None = None) -> RequestOutput:
    state: OutputState = seq.state
    if state.held_text is not None:  # final-only: everything not handed out yet
        text = "".join(state.held_text) + text
        logprobs = [*(state.held_logprobs or []), *(logprobs or [])] or None
        token_ids = list(seq.output_token_ids)
        state.held_text, state.held_logprobs = [], []
    prompt_lps = None
    if state.prompt_logprobs is not None and not state.prompt_logprobs_sent:
        prompt_lps, state.prompt_logprobs_sent = list(state.prompt_logprobs), True  # a copy: it leaves this thread
    if finish is not None:
        seq.timings.finished = time.monotonic()
    adapter = seq.adapter_key
    return RequestOutput(
        request_id=seq.request_id, new_token_ids=token_ids, new_text=text, finished=finish is not None,
        finish_reason=finish, stop_reason=stop_reason,
        new_logprobs=logprobs if seq.params.logprobs is not None else None, prompt_logprobs=prompt_lps,
        usage=Usage(seq.num_prompt_tokens, seq.num_output_tokens, max(seq.num_cached_tokens, 0)),
        timings=_copy_timings(seq.timings), adapter=adapter[0] if adapter else None,
        adapter_version=adapter[1] if adapter else None, error=error)
