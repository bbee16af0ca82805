"""Vectorised sampling for one step: penalties, temperature, top-k/top-p/min-p, draw.

Order (as in vLLM): logprobs from the raw logits; repetition, frequency and
presence penalties; greedy rows take the argmax; the others are divided by
their temperature, filtered by top-k, top-p and min-p, and sampled with the
exponential race ``argmax(probs / q)``, ``q ~ Exp(1)``. A seeded row draws its
``q`` ([V]) from its own generator, so its tokens do not depend on the batch
it runs in; unseeded rows share the sampler's default generator.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor

from loraplex.backend.outputs import Logprob
from loraplex.backend.sampling_params import SamplingParams

_NEG_INF = float("-inf")
_BIG = torch.finfo(torch.float32).max  # +inf logits become this, so softmax stays finite
# temperatures below this are greedy (as in vLLM): dividing by them overflows float32 to ties
TEMPERATURE_FLOOR = 1e-5


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (one per seeded request)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SamplingBatch:
    """Per-step sampling parameters of the R requests that sample this step."""

    temperature: Tensor  # [R] float32; below TEMPERATURE_FLOOR = greedy
    top_k: Tensor  # [R] int64, 0 = off
    top_p: Tensor  # [R] float32, 1 = off
    min_p: Tensor  # [R] float32, 0 = off
    repetition_penalty: Tensor  # [R] float32, 1 = off
    presence_penalty: Tensor  # [R] float32, 0 = off
    frequency_penalty: Tensor  # [R] float32, 0 = off
    generators: list[torch.Generator | None]  # [R], None = default generator
    num_logprobs: list[int | None]  # [R], None = no logprobs
    greedy: list[bool]  # [R], temperature < TEMPERATURE_FLOOR
    output_counts: Tensor | None  # [R, V] int32 occurrences in the output; None without penalties
    seen_mask: Tensor | None  # [R, V] bool, in prompt or output; None without repetition penalty
    max_top_k: int  # largest top_k of a sampled row, at most V; 0 = no row uses top-k
    any_top_p: bool
    any_min_p: bool
    blocked: tuple[Tensor, Tensor] | None = None  # (rows [N], token ids [N]) never sampled this step

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
        blocked: list[list[int]] | None = None,
    ) -> SamplingBatch:
        """``blocked[r]``: token ids row r may not sample now (EOS before min_tokens)."""
        assert len(params) == len(prompt_ids) == len(output_ids) == len(generators)

        def column(name: str, dtype: torch.dtype) -> Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        greedy = [p.temperature < TEMPERATURE_FLOOR for p in params]
        repeats = [p.repetition_penalty != 1.0 for p in params]
        counted = [
            r or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            for p, r in zip(params, repeats, strict=True)
        ]
        output_counts = seen_mask = None
        if any(counted):  # rows without penalties count nothing
            output_counts = _token_counts(_only(output_ids, counted), vocab_size, device)
        if any(repeats):
            assert output_counts is not None
            seen_mask = (_token_counts(_only(prompt_ids, repeats), vocab_size, device) > 0) | (
                output_counts > 0
            )
        random_rows = [p for p, g in zip(params, greedy, strict=True) if not g]
        return cls(
            temperature=column("temperature", torch.float32),
            top_k=column("top_k", torch.int64),
            top_p=column("top_p", torch.float32),
            min_p=column("min_p", torch.float32),
            repetition_penalty=column("repetition_penalty", torch.float32),
            presence_penalty=column("presence_penalty", torch.float32),
            frequency_penalty=column("frequency_penalty", torch.float32),
            generators=list(generators),
            num_logprobs=[p.logprobs for p in params],
            greedy=greedy,
            output_counts=output_counts,
            seen_mask=seen_mask,
            max_top_k=min(max((p.top_k for p in random_rows), default=0), vocab_size),
            any_top_p=any(p.top_p < 1.0 for p in random_rows),
            any_min_p=any(p.min_p > 0.0 for p in random_rows),
            blocked=_blocked_index(blocked, vocab_size, device),
        )

    def __len__(self) -> int:
        return len(self.generators)

    @property
    def all_greedy(self) -> bool:
        return all(self.greedy)

    @property
    def any_greedy(self) -> bool:
        return any(self.greedy)


def _token_counts(ids: list[list[int]], vocab_size: int, device: torch.device | str) -> Tensor:
    """[R, V] int32: how often each token occurs in each row's ``ids``."""
    counts = torch.zeros(len(ids) * vocab_size, dtype=torch.int32, device=device)  # [R * V]
    flat = array("q", chain.from_iterable(ids))  # [T], faster than torch.tensor(list)
    if flat:
        lengths = torch.tensor([len(row) for row in ids])
        rows = torch.repeat_interleave(torch.arange(len(ids)), lengths)  # [T]
        index = (rows * vocab_size + torch.frombuffer(flat, dtype=torch.int64)).to(device)
        counts.scatter_add_(0, index, torch.ones_like(index, dtype=torch.int32))
    return counts.view(len(ids), vocab_size)


def _blocked_index(blocked: list[list[int]] | None, vocab_size: int,
                   device: torch.device | str) -> tuple[Tensor, Tensor] | None:
    pairs = [(r, t) for r, ids in enumerate(blocked or ()) for t in ids if 0 <= t < vocab_size]
    if not pairs:
        return None
    rows, cols = zip(*pairs, strict=True)
    return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device))


def _only(ids: list[list[int]], keep: list[bool]) -> list[list[int]]:
    return [row if k else [] for row, k in zip(ids, keep, strict=True)]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [R]
    logprobs: list[Logprob | None]  # [R], None where the request asked for none


class Sampler:
    """Samples one token per row of ``logits`` under the batch's parameters."""

    def __init__(self, default_generator: torch.Generator | None = None):
        self.default_generator = default_generator  # None = torch's global generator

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [R, V] in any float dtype; not modified."""
        assert logits.dim() == 2 and logits.shape[0] == len(batch), (tuple(logits.shape), len(batch))
        raw = _sanitize(logits.float())  # [R, V]
        penalised = apply_penalties(raw, batch)
        if batch.blocked is not None:
            penalised = penalised.index_put(batch.blocked, torch.tensor(_NEG_INF, device=penalised.device))
        tokens = penalised.argmax(dim=-1) if batch.any_greedy else None  # [R]
        if not batch.all_greedy:
            sampled = self._sample(penalised, batch)
            greedy = torch.tensor(batch.greedy, device=penalised.device)
            tokens = sampled if tokens is None else torch.where(greedy, tokens, sampled)
        assert tokens is not None
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=_chosen_logprobs(raw, tokens, batch))

    def _sample(self, logits: Tensor, batch: SamplingBatch) -> Tensor:
        """[R, V] penalised logits -> [R] sampled ids (greedy rows get a throwaway draw)."""
        temperature = torch.where(batch.temperature >= TEMPERATURE_FLOOR, batch.temperature, 1.0)
        logits = _sanitize(logits / temperature.unsqueeze(1))
        logits = apply_top_k_top_p(logits, batch)
        if batch.any_min_p:
            logits = apply_min_p(logits, batch.min_p)
        probs = logits.softmax(dim=-1)  # [R, V]
        q = self._exponential_noise(probs, batch)
        sampled = (probs / q).argmax(dim=-1)  # [R]
        has_choice = torch.isfinite(logits).any(dim=-1)  # rows left with nothing: fall back to argmax
        return torch.where(has_choice, sampled, logits.argmax(dim=-1))

    def _exponential_noise(self, probs: Tensor, batch: SamplingBatch) -> Tensor:
        """[R, V] Exp(1) noise: seeded rows from their own generator, one [V] draw per step."""
        q = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(batch.generators) if g is None]
        if unseeded:
            rows = torch.empty(len(unseeded), probs.shape[1], device=probs.device)
            q[unseeded] = rows.exponential_(generator=self.default_generator)
        for i, generator in enumerate(batch.generators):
            if generator is not None and not batch.greedy[i]:
                q[i].exponential_(generator=generator)
            elif generator is not None:
                q[i] = 1.0  # a greedy row leaves its generator untouched
        return q.clamp_(min=torch.finfo(q.dtype).tiny)  # q == 0 would turn p == 0 into NaN


def _sanitize(logits: Tensor) -> Tensor:
    """NaN -> -inf (never chosen), +inf -> largest float (softmax stays finite)."""
    return torch.nan_to_num(logits, nan=_NEG_INF, posinf=_BIG, neginf=_NEG_INF)


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """[R, V] -> [R, V]: repetition (prompt + output), then frequency and presence (output)."""
    if batch.output_counts is None:
        return logits
    if batch.seen_mask is not None:
        penalty = batch.repetition_penalty.unsqueeze(1)  # [R, 1]
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_mask, scaled, logits)
    counts = batch.output_counts.to(logits.dtype)  # [R, V]
    logits = logits - batch.frequency_penalty.unsqueeze(1) * counts
    return logits - batch.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_top_k_top_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """[R, V] -> [R, V] with the tokens outside top-k / the top-p nucleus set to -inf.

    Ties with the k-th logit are kept; the nucleus is the smallest set of most
    likely tokens whose probability reaches top_p.
    """
    if not batch.any_top_p:
        return _top_k_only(logits, batch.top_k, batch.max_top_k) if batch.max_top_k else logits
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [R, V]
    if batch.max_top_k:
        k = torch.where(batch.top_k > 0, batch.top_k, vocab).clamp(max=vocab)  # [R]
        kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))  # [R, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V] mass of the more likely tokens
    top_p = batch.top_p.unsqueeze(1)  # [R, 1]
    outside = (mass_before >= top_p) & (top_p < 1.0)
    outside[:, 0] = False  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(outside, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _top_k_only(logits: Tensor, top_k: Tensor, max_top_k: int) -> Tensor:
    """top-k without a full sort: the k-th largest logit from ``topk(max_top_k)``."""
    top_values = logits.topk(max_top_k, dim=-1).values  # [R, max_top_k], descending
    k = top_k.clamp(min=1, max=max_top_k)  # [R]
    kth = top_values.gather(1, (k - 1).unsqueeze(1))  # [R, 1]
    kth = torch.where(top_k.unsqueeze(1) > 0, kth, _NEG_INF)  # top_k == 0: keep all
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drops tokens with p < min_p * p_max, i.e. logit < max_logit + log(min_p)."""
    threshold = logits.max(dim=-1, keepdim=True).values + min_p.log().unsqueeze(1)  # [R, 1]
    return logits.masked_fill(logits < threshold, _NEG_INF)


def _log_softmax(raw: Tensor) -> Tensor:
    """[N, V] float32 log-probabilities; a row without finite logits gives -inf, not NaN."""
    return torch.nan_to_num(raw.log_softmax(dim=-1), nan=_NEG_INF)


def _logprob_entries(logprobs: Tensor, token_ids: Tensor, ks: Sequence[int]) -> list[Logprob]:
    """One Logprob per row of ``logprobs`` [N, V]: chosen ``token_ids`` [N], top ``ks[n]``."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [N]
    top_values, top_ids = logprobs.topk(max(ks, default=0), dim=-1)  # [N, k_max]
    columns = (
        token_ids.tolist(),
        chosen.squeeze(1).tolist(),
        ranks.tolist(),
        top_ids.tolist(),
        top_values.tolist(),
    )
    rows = zip(*columns, ks, strict=True)
    return [
        Logprob(token_id=t, logprob=lp, rank=r, top=list(zip(ids[:k], values[:k], strict=True)))
        for t, lp, r, ids, values, k in rows
    ]


def _chosen_logprobs(raw: Tensor, tokens: Tensor, batch: SamplingBatch) -> list[Logprob | None]:
    """Logprobs (of the raw model distribution) for the rows that asked for them."""
    wanted = [i for i, k in enumerate(batch.num_logprobs) if k is not None]
    out: list[Logprob | None] = [None] * len(batch)
    if not wanted:
        return out
    ks = [batch.num_logprobs[i] or 0 for i in wanted]
    entries = _logprob_entries(_log_softmax(raw[wanted]), tokens[wanted], ks)
    for i, entry in zip(wanted, entries, strict=True):
        out[i] = entry
    return out


def prompt_logprobs(logits: Tensor, next_token_ids: Tensor, k: int) -> list[Logprob]:
    """Logprobs of the prompt: ``logits`` [P, V] at positions 0..P-1, ``next_token_ids`` [P]
    the prompt tokens that follow them; the top ``k`` alternatives per position."""
    assert logits.shape[0] == next_token_ids.shape[0], (tuple(logits.shape), tuple(next_token_ids.shape))
    logprobs = _log_softmax(_sanitize(logits.float()))
    return _logprob_entries(logprobs, next_token_ids.to(logits.device, torch.int64), [k] * logits.shape[0])
