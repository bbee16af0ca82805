"""Issue 11: a temperature below the floor is greedy, no in-range parameter makes NaN, and
min_tokens masks EOS (and stop token ids) out of sampling."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.backend.engine.sampler import Sampler, SamplingBatch
from loraplex.backend.sampling_params import SamplingParams

V = 32


def sample(logits: torch.Tensor, params: list[SamplingParams], blocked: list[list[int]] | None = None,
           outputs: list[list[int]] | None = None) -> list[int]:
    batch = SamplingBatch.build(params, [[1, 2]] * len(params), outputs or [[3]] * len(params),
                                [None] * len(params), V, "cpu", blocked=blocked)
    return Sampler(torch.Generator().manual_seed(0))(logits, batch).token_ids


def test_tiny_temperature_is_greedy() -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)) * 5
    for t in (1e-40, 1e-30, 1e-7):
        for top_k in (0, 1):
            params = [SamplingParams(temperature=t, top_k=top_k, seed=None)] * 4
            assert sample(logits, params) == logits.argmax(-1).tolist(), (t, top_k)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
params_st = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 2.0), st.floats(1e-45, 1e-3)),
    top_p=st.floats(1e-45, 1.0, exclude_min=False).filter(lambda p: p > 0),
    top_k=st.integers(0, V + 3), min_p=st.floats(0.0, 1.0),
    repetition_penalty=st.floats(1e-45, 2.0).filter(lambda p: p > 0),
    presence_penalty=st.floats(-2.0, 2.0), frequency_penalty=st.floats(-2.0, 2.0))


@settings(max_examples=150, deadline=None)
@given(st.lists(params_st, min_size=1, max_size=4), st.data())
def test_no_in_range_parameter_breaks_sampling(params: list[SamplingParams], data: st.DataObject) -> None:
    rows = [data.draw(st.lists(finite, min_size=V, max_size=V)) for _ in params]
    logits = torch.tensor(rows, dtype=torch.float32)
    tokens = sample(logits, params, outputs=[[3, 3, 5]] * len(params))
    assert all(0 <= t < V for t in tokens)
    for p, row, t in zip(params, logits, tokens, strict=True):
        if p.temperature < 1e-5 and p.repetition_penalty == 1 and not p.presence_penalty and not p.frequency_penalty:
            assert row[t] == row.max()  # greedy rows really are greedy


def test_blocked_tokens_are_never_sampled() -> None:
    logits = torch.zeros(2, V)
    logits[:, 7] = 100.0  # "EOS" dominates
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3)]
    assert 7 not in sample(logits, params, blocked=[[7], [7]])
    assert sample(logits, params, blocked=[[], []]) == [7, 7]
