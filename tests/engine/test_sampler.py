"""Sampler: greedy, penalties, filters, seeded determinism, distribution, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.backend.engine.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    make_generator,
    prompt_logprobs,
)
from loraplex.backend.sampling_params import SamplingParams

V = 50


def build(
    params: list[SamplingParams],
    prompt_ids: list[list[int]] | None = None,
    output_ids: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    vocab: int = V,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params,
        prompt_ids if prompt_ids is not None else [[] for _ in range(n)],
        output_ids if output_ids is not None else [[] for _ in range(n)],
        generators if generators is not None else [None] * n,
        vocab,
        "cpu",
    )


def sample_many(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """[n] draws for one row's logits [V], as a batch of n identical unseeded rows."""
    sampler = Sampler(make_generator(seed, "cpu"))
    out = sampler(logits_row.expand(n, -1), build([params] * n, vocab=logits_row.numel()))
    return torch.tensor(out.token_ids)


# -- greedy -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_greedy_is_argmax(dtype: torch.dtype, rows: int) -> None:
    logits = torch.randn(rows, V, generator=make_generator(rows, "cpu")).to(dtype)
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.5)] * rows  # filters ignored
    out = Sampler()(logits, build(params))
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * rows


def test_greedy_ties_take_the_lowest_id() -> None:
    logits = torch.zeros(2, V)
    logits[0, [7, 3, 30]] = 5.0
    logits[1, [40, 41]] = float("inf")
    assert Sampler()(logits, build([SamplingParams(temperature=0.0)] * 2)).token_ids == [3, 40]


def test_logits_are_not_modified() -> None:
    logits = torch.randn(4, V)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, top_k=5, top_p=0.8, min_p=0.1)] * 4
    Sampler()(logits, build(params, output_ids=[[1, 2, 2]] * 4, prompt_ids=[[3]] * 4))
    assert torch.equal(logits, before)


# -- penalties ----------------------------------------------------------------


def naive_penalties(
    logits: list[float], prompt: list[int], output: list[int], p: SamplingParams
) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


PENALTY_PARAMS = st.builds(
    SamplingParams,
    repetition_penalty=st.floats(0.1, 2.0),
    presence_penalty=st.floats(-2.0, 2.0),
    frequency_penalty=st.floats(-2.0, 2.0),
    temperature=st.sampled_from([0.0, 1.0]),
)
IDS = st.lists(st.integers(0, 15), max_size=12)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.tuples(PENALTY_PARAMS, IDS, IDS), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_penalties_match_naive_reference(
    rows: list[tuple[SamplingParams, list[int], list[int]]], seed: int
) -> None:
    logits = torch.randn(len(rows), 16, generator=make_generator(seed, "cpu")) * 3
    params, prompts, outputs = (list(x) for x in zip(*rows, strict=True))
    got = apply_penalties(logits, build(params, prompts, outputs, vocab=16))
    want = [naive_penalties(logits[i].tolist(), prompts[i], outputs[i], params[i]) for i in range(len(rows))]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.5, -1.0]])
    sampler = Sampler()
    assert sampler(logits, build([SamplingParams(temperature=0)], vocab=4)).token_ids == [0]
    repetition = build([SamplingParams(temperature=0, repetition_penalty=1.2)], prompt_ids=[[0]], vocab=4)
    assert sampler(logits, repetition).token_ids == [1]  # 2.0 / 1.2 < 1.9
    presence = build([SamplingParams(temperature=0, presence_penalty=2.0)], output_ids=[[0, 1]], vocab=4)
    assert sampler(logits, presence).token_ids == [2]
    frequency = build([SamplingParams(temperature=0, frequency_penalty=0.1)], output_ids=[[0, 0]], vocab=4)
    assert sampler(logits, frequency).token_ids == [1]
    prompt_only = build([SamplingParams(temperature=0, frequency_penalty=2.0)], prompt_ids=[[0, 0]], vocab=4)
    assert sampler(logits, prompt_only).token_ids == [0]  # frequency counts the output only


# -- filters ------------------------------------------------------------------

SMALL = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0])  # [12]


def allowed_tokens(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Naive top-k, then top-p, then min-p over one row (distinct logits)."""
    probs = (logits / p.temperature).softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    if p.top_k:
        order = order[: p.top_k]
    kept_mass = sum(probs[t] for t in order)
    nucleus, mass = [], 0.0
    for t in order:
        nucleus.append(t)
        mass += probs[t] / kept_mass
        if mass >= p.top_p:
            break
    return {t for t in nucleus if probs[t] >= p.min_p * probs[nucleus[0]]}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.6),
        SamplingParams(min_p=0.2),
        SamplingParams(top_k=5, top_p=0.9, min_p=0.1, temperature=1.5),
        SamplingParams(top_k=1, temperature=2.0),
        SamplingParams(top_p=0.05),
    ],
)
def test_filters_never_sample_a_filtered_token(params: SamplingParams) -> None:
    draws = sample_many(SMALL, params, n=4000)
    allowed = allowed_tokens(SMALL, params)
    assert set(draws.tolist()) == allowed  # nothing outside; everything inside shows up


def test_mixed_filters_in_one_batch() -> None:
    params = [
        SamplingParams(top_k=2),
        SamplingParams(top_p=0.5),
        SamplingParams(),
        SamplingParams(temperature=0),
    ]
    rows = params * 500
    out = Sampler(make_generator(1, "cpu"))(SMALL.expand(len(rows), -1), build(rows, vocab=12))
    draws = torch.tensor(out.token_ids).view(500, 4)
    for j, p in enumerate(params):
        expected = {0} if p.greedy else allowed_tokens(SMALL, p)
        assert set(draws[:, j].tolist()) <= expected
    assert len(set(draws[:, 2].tolist())) >= 8  # the unfiltered row spreads out


# -- distribution -------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_distribution_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.5])
    n = 20000
    draws = sample_many(logits, SamplingParams(temperature=temperature), n=n, seed=7)
    observed = torch.bincount(draws, minlength=8).double()
    expected = (logits / temperature).softmax(-1).double() * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 40.0, (chi2, observed.tolist(), expected.tolist())  # df = 7; p(chi2 > 40) ~ 1e-6


# -- seeds --------------------------------------------------------------------


def test_seeded_request_is_batch_independent() -> None:
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    steps = [torch.randn(16, V, generator=make_generator(100 + s, "cpu")) for s in range(12)]
    alone_gen, sampler = make_generator(1234, "cpu"), Sampler(make_generator(0, "cpu"))
    alone = [sampler(logits[5:6], build([target], generators=[alone_gen])).token_ids[0] for logits in steps]

    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=4),
        SamplingParams(temperature=1.3, min_p=0.05, seed=99),
        SamplingParams(top_p=0.3, presence_penalty=1.0),
    ]
    params = [others[i % 4] for i in range(16)]
    params[5] = target
    gens = [make_generator(p.seed, "cpu") if p.seed is not None else None for p in params]
    batched_sampler = Sampler(make_generator(42, "cpu"))
    batched = []
    for s, logits in enumerate(steps):
        batch = build(params, output_ids=[[s % V]] * 16, generators=gens)
        batched.append(batched_sampler(logits, batch).token_ids[5])
    assert batched == alone
    other_seed = make_generator(4321, "cpu")
    assert [sampler(x[5:6], build([target], generators=[other_seed])).token_ids[0] for x in steps] != alone


def test_default_generator_makes_unseeded_rows_reproducible() -> None:
    logits = torch.randn(8, V, generator=make_generator(3, "cpu"))
    batch = build([SamplingParams()] * 8)
    first = Sampler(make_generator(5, "cpu"))(logits, batch).token_ids
    assert Sampler(make_generator(5, "cpu"))(logits, batch).token_ids == first


# -- logprobs -----------------------------------------------------------------


def check_logprob(entry, raw_row: torch.Tensor, token: int, k: int) -> None:
    lp = raw_row.float().log_softmax(-1)
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(lp[token].item(), abs=1e-5)
    assert entry.rank == 1 + int((lp > lp[token]).sum())
    assert [t for t, _ in entry.top] == lp.topk(k).indices.tolist()
    assert [v for _, v in entry.top] == pytest.approx(lp.topk(k).values.tolist(), abs=1e-5)


def test_logprobs_come_from_the_raw_logits() -> None:
    logits = torch.randn(5, V, generator=make_generator(11, "cpu"))
    params = [
        SamplingParams(logprobs=3, temperature=0.0, repetition_penalty=2.0),
        SamplingParams(logprobs=0, temperature=1.5, frequency_penalty=2.0),
        SamplingParams(),
        SamplingParams(logprobs=20, top_k=5),
        SamplingParams(logprobs=1, temperature=2.0, top_p=0.9),
    ]
    out = Sampler(make_generator(0, "cpu"))(logits, build(params, output_ids=[list(range(10))] * 5))
    assert out.logprobs[2] is None
    for i in (0, 1, 3, 4):
        check_logprob(out.logprobs[i], logits[i], out.token_ids[i], params[i].logprobs or 0)
    assert out.logprobs[1].top == []


def test_rank_counts_strictly_better_tokens() -> None:
    greedy = SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=2.0)
    tie = Sampler()(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), build([greedy], vocab=4))
    assert tie.token_ids == [1]
    assert tie.logprobs[0].rank == 1  # token 2 ties, it is not better
    penalised = Sampler()(torch.tensor([[2.0, 3.0, 3.0, 0.0]]), build([greedy], prompt_ids=[[1, 2]], vocab=4))
    assert penalised.token_ids == [0]  # 3 / 2 < 2
    assert penalised.logprobs[0].rank == 3  # ranked in the raw distribution
    assert {t for t, _ in penalised.logprobs[0].top} == {1, 2}


def test_prompt_logprobs() -> None:
    logits = torch.randn(6, V, generator=make_generator(2, "cpu")).bfloat16()
    next_ids = torch.tensor([4, 9, 0, 49, 4, 17])
    entries = prompt_logprobs(logits, next_ids, k=4)
    assert len(entries) == 6
    for row, token, entry in zip(logits, next_ids.tolist(), entries, strict=True):
        check_logprob(entry, row, token, 4)


# -- non-finite logits --------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits(temperature: float) -> None:
    logits = torch.randn(4, V, generator=make_generator(9, "cpu"))
    logits[0, ::2] = float("nan")  # NaN tokens must never be chosen
    logits[1] = float("nan")  # nothing to choose: fall back to argmax (token 0)
    logits[2, 17] = float("inf")  # +inf wins
    logits[3] = float("-inf")
    params = [SamplingParams(temperature=temperature, logprobs=2, top_p=0.9, min_p=0.1)] * 4
    out = Sampler(make_generator(0, "cpu"))(logits, build(params))
    assert out.token_ids[0] % 2 == 1
    assert out.token_ids[1:] == [0, 17, 0]
    assert out.logprobs[2].logprob == pytest.approx(0.0)
    assert math.isinf(out.logprobs[1].logprob)
