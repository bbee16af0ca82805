"""The built-in demo through loraplex's own engine: one generate call mixing the base model and
every demo adapter gives each request its own transformation (greedy exact match >= 99%)."""

from __future__ import annotations

import pytest

from loraplex import SamplingParams
from loraplex.backend.demo import DEMO_ADAPTERS, expected_output, sample_inputs
from tests.engine_factory import assert_no_leaks

TASKS: list[str | None] = [None, *sorted(DEMO_ADAPTERS)]
N_PER_TASK = 100


ENGINE_ARGS = {"max_num_seqs": 128, "max_num_batched_tokens": 4096}  # the `llm` fixture: the demo model


def test_demo_adapters_are_registered(llm):
    assert {a.name for a in llm.list_adapters()} == set(DEMO_ADAPTERS)


@pytest.mark.slow  # 500 requests of up to 96 tokens: minutes on a CPU
def test_one_mixed_generate_call_accuracy(llm):
    inputs = sample_inputs(N_PER_TASK, seed=777)  # held out: training used other seeds
    prompts, adapters, expected = [], [], []
    for i, text in enumerate(inputs):
        for j in range(len(TASKS)):
            task = TASKS[(i + j) % len(TASKS)]  # every task interleaved in the one batch
            prompts.append(llm.apply_chat_template([{"role": "user", "content": text}]))
            adapters.append(task)
            expected.append(expected_output(task, text))
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=96), adapters=adapters)
    for task in TASKS:
        rows = [k for k, a in enumerate(adapters) if a == task]
        hits = sum(outs[k].text == expected[k] for k in rows)
        assert hits / len(rows) >= 0.99, f"{task or 'base'}: {hits}/{len(rows)}"
        assert all(outs[k].finish_reason == "stop" for k in rows if outs[k].text == expected[k])
    assert_no_leaks(llm.engine)


def test_readme_offline_example(llm):
    prompts = [llm.apply_chat_template([{"role": "user", "content": t}]) for t in ["abc 123", "Hello"]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32), adapters=["reverse", None])
    assert [o.text for o in outs] == ["321 cba", "Hello"]
