"""Bad input is refused before any work, with an error naming the field; nothing else is disturbed."""

from __future__ import annotations

import pytest

from loraplex import SamplingParams
from loraplex.backend.engine.request import EngineRequest
from loraplex.errors import AdapterNotFoundError, InvalidRequestError
from tests.engine_factory import assert_no_leaks

PARAM_CASES = [
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.01}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 2.5}, "repetition_penalty"), ({"presence_penalty": 2.1}, "presence_penalty"),
    ({"frequency_penalty": -2.1}, "frequency_penalty"), ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
    ({"stop": ["s"] * 17}, "stop"), ({"stop": ["x" * 257]}, "stop"), ({"stop": [""]}, "stop"),
    ({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"seed": -1}, "seed"),
]
EDGE_OK = [{"temperature": 0.0}, {"temperature": 2.0}, {"top_p": 1.0}, {"top_k": -1}, {"stop": ["s"] * 16},
           {"stop": ["x" * 256]}, {"logprobs": 20}, {"min_tokens": 8, "max_tokens": 8}]


@pytest.mark.parametrize(("kwargs", "field"), PARAM_CASES)
def test_sampling_params_refused_naming_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert field in str(err.value)


@pytest.mark.parametrize("kwargs", EDGE_OK)
def test_sampling_params_at_the_limit_are_accepted(kwargs):
    SamplingParams(**kwargs)


TINY_MODEL = "llama"  # the `llm` fixture of tests/conftest.py
ENGINE_ARGS = {"max_model_len": 64, "max_loras": 2, "max_lora_rank": 8}


def request_cases(vocab: int) -> list[tuple[EngineRequest, str]]:
    p = SamplingParams
    return [
        (EngineRequest("a", prompt=""), "prompt"),
        (EngineRequest("b", prompt_token_ids=[]), "prompt_token_ids"),
        (EngineRequest("c", prompt_token_ids=[1, vocab]), "prompt_token_ids"),
        (EngineRequest("d", prompt_token_ids=[1, -1]), "prompt_token_ids"),
        (EngineRequest("e", prompt_token_ids=[1] * 60, params=p(max_tokens=5)), "max_tokens"),
        (EngineRequest("f", prompt_token_ids=[1] * 64), "prompt"),
        (EngineRequest("g", prompt="hi", prompt_token_ids=[1]), "prompt"),
        (EngineRequest("h", prompt_token_ids=[1], params=p(stop_token_ids=[vocab + 5])), "stop_token_ids"),
    ]


def test_bad_requests_refused_and_running_requests_unaffected(llm):
    vocab = llm.engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = llm.generate([[5, 6, 7]], params)[0].token_ids
    llm.engine.add_request(EngineRequest("running", prompt_token_ids=[5, 6, 7], params=params))
    tokens = [t for o in llm.engine.step() for t in o.new_token_ids]
    for req, field in request_cases(vocab):
        with pytest.raises(InvalidRequestError) as err:
            llm.engine.add_request(req)
        assert err.value.field == field, (req, err.value)
    with pytest.raises(AdapterNotFoundError):
        llm.engine.add_request(EngineRequest("z", prompt_token_ids=[1], adapter="no-such-adapter"))
    while llm.engine.has_unfinished():
        tokens += [t for o in llm.engine.step() for t in o.new_token_ids]
    assert tokens == expected
    assert_no_leaks(llm.engine)


def test_duplicate_running_request_id_refused(llm):
    llm.engine.add_request(EngineRequest("dup", prompt_token_ids=[1, 2], params=SamplingParams(max_tokens=2)))
    with pytest.raises(InvalidRequestError) as err:
        llm.engine.add_request(EngineRequest("dup", prompt_token_ids=[3], params=SamplingParams(max_tokens=2)))
    assert err.value.field == "request_id"
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert_no_leaks(llm.engine)
