"""Issue 11.12: an ``LLM.generate`` that exits by an exception (KeyboardInterrupt included) aborts
what it added and leaves the engine usable; adapter sources may be ``os.PathLike``."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex import LLM, SamplingParams
from loraplex.backend.demo import DEMO_ADAPTERS, expected_output
from tests.engine_factory import assert_no_leaks


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(device="cpu", max_model_len=256, max_num_seqs=8, kv_cache_memory_bytes=16 * 2**20)


def interrupt_at_step(llm: LLM, n: int, exc: BaseException) -> None:
    """The engine's ``n``-th step from now raises ``exc`` (what Ctrl-C or a test timeout does)."""
    step, calls = llm.engine.step, [0]

    def interrupted() -> list:  # type: ignore[type-arg]
        calls[0] += 1
        if calls[0] == n:
            del llm.engine.step  # the class method again
            raise exc
        return step()

    llm.engine.step = interrupted  # type: ignore[method-assign]


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), TimeoutError("pytest timeout")], ids=["ctrl-c", "timeout"])
def test_interrupted_generate_aborts_its_requests(llm: LLM, exc: BaseException) -> None:
    prompts = [llm.apply_chat_template([{"role": "user", "content": f"text {i}"}]) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    interrupt_at_step(llm, 3, exc)
    with pytest.raises(type(exc)):
        llm.generate(prompts, params, adapters=["upper", None, "reverse", "upper"])
    assert_no_leaks(llm.engine)
    outs = llm.generate(prompts[:2], params, adapters=["upper", None])  # the same LLM works on
    assert [o.text for o in outs] == [expected_output("upper", "text 0"), expected_output("", "text 1")]
    assert_no_leaks(llm.engine)


def test_load_adapter_accepts_a_path(llm: LLM) -> None:
    info = llm.load_adapter("upper-path", Path(DEMO_ADAPTERS["upper"]))
    assert info.name == "upper-path"
    prompt = llm.apply_chat_template([{"role": "user", "content": "path"}])
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=32), adapters="upper-path")[0]
    assert out.text == expected_output("upper", "path")
    llm.unload_adapter("upper-path")
