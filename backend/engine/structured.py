"""Structured output: grammar-constrained decoding with xgrammar (as vLLM v1 and SGLang do).

- At intake (``StructuredOutputs.request_grammar``, on the caller's thread, before the request
  is queued) the request's constraint is compiled against the tokenizer, or taken from an
  LRU cache keyed by its content; a bad schema, regex or grammar is an InvalidRequestError
  naming the field. Each request gets its own ``GrammarMatcher``.
- Each step (``apply_grammar_bitmask``, runner) the constrained rows' allowed-token bitmasks
  ([R, ceil(V/32)] int32) are filled on the CPU while the device runs the forward pass, then
  applied to the logits on the device, before penalties and sampling. Tokens past the
  tokenizer's vocabulary (the model's padded logits) are never allowed.
- After each sampled token (``after_token``, engine) the matcher catches up with the output
  tokens it has not seen, so a preempted and recomputed request never advances it twice. A
  terminated matcher (its stop token accepted) ends the request with finish_reason "stop".
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from loraplex.backend.engine.output import flush_text
from loraplex.backend.outputs import RequestOutput
from loraplex.backend.sampling_params import SamplingParams, StructuredOutputsParams
from loraplex.errors import InvalidRequestError
from loraplex.kernels.bitmask import apply_token_bitmask

log = logging.getLogger(__name__)

CACHE_ENTRIES = 256  # compiled grammars kept (LRU, by content)
_XGR_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[08:07:20] /path/file.cc:94: " prefix


class StructuredOutputs:
    """One per engine: the compiler (built on first use), its content-keyed cache, a bitmask buffer."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int], cache_entries: int = CACHE_ENTRIES):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits width
        # the tokens the tokenizer can spell: the grammar's bitmask covers these only (xgrammar's fill
        # costs time per token of its vocabulary: 7 ms a step for 32 rows at 151,936 padded ids
        # against 0.1 ms at the demo tokenizer's 265); ids past it are never allowed (the mask op)
        self.mask_vocab = min(vocab_size, tokenizer_vocab_size(tokenizer))
        self.eos_ids = sorted(eos_ids)
        self.cache_entries = cache_entries
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._buffer: torch.Tensor | None = None
        self._batch: Any = None  # xgrammar's BatchGrammarMatcher, built on first use
        self.compile_seconds = 0.0  # total time spent compiling (cache misses)

    def request_grammar(self, params: SamplingParams) -> RequestGrammar | None:
        """The matcher for one request, or None when it is unconstrained. Thread-safe."""
        spec = params.structured_outputs
        if spec is None:
            return None
        import xgrammar as xgr

        return RequestGrammar(xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=self.eos_ids), self)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of ``spec`` (cached by content); InvalidRequestError when it is bad."""
        key = _cache_key(spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        start = time.perf_counter()
        compiled = self._compile_uncached(spec)
        with self._lock:
            self.compile_seconds += time.perf_counter() - start
            self._cache[key] = compiled
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return compiled

    def _compile_uncached(self, spec: StructuredOutputsParams) -> Any:
        compiler = self._get_compiler()
        kind = spec.kind
        try:
            if kind == "json":
                return compiler.compile_json_schema(json.dumps(safe_schema(spec.json)), any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice or []))
            if kind == "grammar":
                return compiler.compile_grammar(spec.grammar)
            return compiler.compile_structural_tag(compact_json_formats(spec.structural_tag or ""))
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own types
            raise InvalidRequestError(spec.field_name(kind), f"cannot be compiled: {_clean(exc)}") from exc

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.mask_vocab,
                                                          stop_token_ids=self.eos_ids)
                # our own LRU keeps compiled grammars; xgrammar's cache would grow without bound
                self._compiler = xgr.GrammarCompiler(info, max_threads=4, cache_enabled=False)
            return self._compiler

    def batch_matcher(self) -> Any:
        """xgrammar's batch matcher: fills many rows' bitmasks on its own threads."""
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher(max_threads="auto")
        return self._batch

    def warm_up(self, device: torch.device) -> None:
        """Compiles the bitmask kernel (one kernel serves every batch size)."""
        logits = torch.zeros((1, self.vocab_size), dtype=torch.float32, device=device)
        apply_token_bitmask(logits, self.bitmask_buffer(1, device).to(device), [0], vocab=self.mask_vocab)

    def bitmask_buffer(self, rows: int, device: torch.device) -> torch.Tensor:
        """A CPU int32 [rows, ceil(mask_vocab/32)] view of a reused buffer (pinned when the device is a GPU)."""
        words = -(-self.mask_vocab // 32)
        if self._buffer is None or self._buffer.shape[0] < rows:
            pin = device.type == "cuda"
            self._buffer = torch.empty((max(rows, 64), words), dtype=torch.int32, pin_memory=pin)
        return self._buffer[:rows]


class RequestGrammar:
    """One request's matcher and how many of its output tokens the matcher has accepted."""

    def __init__(self, matcher: Any, owner: StructuredOutputs):
        self.matcher = matcher
        self.owner = owner
        self.num_accepted = 0
        self.rejected: int | None = None  # a token the grammar refused (never expected under the mask)

    def advance(self, output_token_ids: list[int]) -> None:
        """Accepts the output tokens not accepted yet (each token exactly once)."""
        while self.num_accepted < len(output_token_ids) and self.rejected is None:
            token = output_token_ids[self.num_accepted]
            if self.matcher.is_terminated() or not self.matcher.accept_token(token):
                self.rejected = token
                return
            self.num_accepted += 1

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """One past the largest id the tokenizer knows (added tokens included)."""
    return max(tokenizer.get_vocab().values(), default=-1) + 1


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def compact_json_formats(structural_tag: str) -> str:
    """The structural tag with each JSON-schema region turned into the grammar of its compact
    JSON (as the json kind writes it): xgrammar's own would allow unbounded whitespace there."""
    import xgrammar as xgr

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(n) for n in node]
        if not isinstance(node, dict):
            return node
        if node.get("type") == "json_schema" and node.get("style", "json") == "json" and "json_schema" in node:
            schema = node["json_schema"]
            grammar = xgr.Grammar.from_json_schema(json.dumps(safe_schema(schema)), any_whitespace=False)
            return {"type": "grammar", "grammar": str(grammar)}
        return {k: rewrite(v) for k, v in node.items()}

    return json.dumps(rewrite(json.loads(structural_tag)))


_STRING_CHARS = r'^[^\x00-\x1f"\\]'  # a JSON string's unescaped characters
_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})  # values, not subschemas


def safe_schema(schema: Any) -> Any:
    """``schema`` with each length-bounded string (no pattern or format of its own) given the
    equivalent pattern: xgrammar 0.2's counted-string rule lets raw control characters into the
    JSON string, which is then not valid JSON; its pattern rule does not."""
    if isinstance(schema, list):
        return [safe_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYS else safe_schema(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and "pattern" not in out and "format" not in out:
        lo, hi = int(out.get("minLength", 0)), out.get("maxLength")
        out["pattern"] = _STRING_CHARS + "{" + f"{lo},{'' if hi is None else int(hi)}" + "}$"
    return out


def _cache_key(spec: StructuredOutputsParams) -> str:
    value = getattr(spec, spec.kind)
    return spec.kind + "\0" + (value if isinstance(value, str) else json.dumps(value, sort_keys=True))


def _clean(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return _XGR_NOISE.sub("", text)


# ---- the hooks the engine and the runner call --------------------------------------------------


def apply_grammar_bitmask(logits: torch.Tensor, seqs: list[Any]) -> None:
    """Masks, in place, the tokens each constrained row's grammar forbids next.

    ``logits``: [R, V] float for ``seqs`` (R sampling sequences; V = the model's logits width; the
    bitmask covers the tokenizer's ids, and the ids past them are forbidden); rows without a
    grammar are left alone. The constrained rows' bitmasks are
    filled by xgrammar's batch matcher (on its threads, GIL released) and applied on the logits'
    device by kernels.bitmask (xgrammar's Triton kernel specialises on the row count and so
    recompiled in the middle of serving, and it cannot forbid the ids past a narrower mask).
    """
    # a finished grammar (terminated, or a refused token) means the request has ended: this row's
    # token is surplus (the step was launched before its end was known) and is left unmasked
    rows = [i for i, s in enumerate(seqs) if getattr(s, "structured", None) is not None
            and s.structured.rejected is None and not s.structured.terminated]
    if not rows:
        return
    grammars: list[RequestGrammar] = [seqs[i].structured for i in rows]
    owner = grammars[0].owner
    bitmask = owner.bitmask_buffer(len(seqs), logits.device)
    owner.batch_matcher().batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask, indices=rows)
    # the mask covers the tokenizer's ids; the model's padded ids past them become -inf too (the
    # last word's bits past mask_vocab are padding xgrammar never writes: `vocab` forbids them)
    apply_token_bitmask(logits, bitmask.to(logits.device, non_blocking=True), rows, vocab=owner.mask_vocab)


def after_token(seq: Any, out: RequestOutput) -> None:
    """Advances ``seq``'s matcher over its new output token; ends the request when the grammar is
    done ("stop") or, never expected under the mask, refused the token ("abort" with an error)."""
    grammar: RequestGrammar | None = getattr(seq, "structured", None)
    if grammar is None:
        return
    grammar.advance(seq.output_token_ids)
    if out.finished:
        return
    if grammar.rejected is not None:
        log.error("request %s: token %d refused by its grammar", seq.request_id, grammar.rejected)
        _finish(seq, out, "abort", error=f"token {grammar.rejected} does not match the structured output")
    elif grammar.terminated:
        _finish(seq, out, "stop")


def _finish(seq: Any, out: RequestOutput, reason: str, error: str | None = None) -> None:
    if reason == "stop":
        out.new_text += flush_text(seq.state)
    out.finished, out.finish_reason, out.error = True, reason, error
    seq.timings.finished = out.timings.finished = time.monotonic()
