"""The engine on CUDA in bf16: logits close to HF transformers (+ PEFT) in float32, Triton LoRA path."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loraplex import LLM, SamplingParams
from tests.engine_factory import assert_no_leaks, load_hf, write_tiny_model
from tests.lora_factory import make_peft_adapter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[5, 9, 17, 33, 2], [40, 41], [7] * 19, [100, 3, 8, 21, 60, 61, 62]]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_logits_close_to_fp32_reference(tmp_path, arch):
    base_dir = write_tiny_model(tmp_path / "base", arch, hidden_size=256, intermediate_size=512,
                                num_attention_heads=8, num_key_value_heads=2, initializer_range=0.05)
    hf = load_hf(base_dir)
    adapter = make_peft_adapter(hf, tmp_path / "a", r=16, alpha=32, targets="all-linear", seed=1)
    refs = {None: hf, "a": PeftModel.from_pretrained(copy.deepcopy(hf), adapter).eval()}
    llm = LLM(str(base_dir), dtype="bfloat16", device="cuda", kv_cache_memory_bytes=2**28, max_lora_rank=16,
              adapter_roots=[str(tmp_path)])
    llm.load_adapter("a", str(adapter))
    captured: list[torch.Tensor] = []
    runner = llm.engine.runner
    original = runner._sample  # the sampling rows' logits, from every path (eager, step graph)
    runner._sample = lambda logits, *a: captured.append(logits.float()) or original(logits, *a)  # type: ignore[method-assign]
    names = ["a", None, "a", None]
    llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=1), adapters=names)
    runner._sample = original  # type: ignore[method-assign]
    for row, (prompt, name) in enumerate(zip(PROMPTS, names, strict=True)):
        with torch.no_grad():
            ref = refs[name](torch.tensor([prompt])).logits[0, -1].float()
        got = captured[0][row].float().cpu()
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < 3e-2, f"row {row} ({name}): relative error {rel}"
    assert_no_leaks(llm.engine)


def test_cuda_graph_decode_matches_eager(tmp_path):
    base_dir = write_tiny_model(tmp_path / "base", "llama")
    hf = load_hf(base_dir)
    adapters = {f"a{i}": make_peft_adapter(hf, tmp_path / f"a{i}", r=4 * (i + 1), alpha=16, targets="all-linear",
                                           seed=i + 1) for i in range(3)}
    prompts = [[3 + i] * (1 + 3 * i) for i in range(9)]
    names = [None, "a0", "a1", "a2", "a0", None, "a2", "a1", "a0"]
    outs = {}
    for eager in (True, False):
        llm = LLM(str(base_dir), dtype="float32", device="cuda", kv_cache_memory_bytes=2**26, max_lora_rank=16, adapter_roots=[str(tmp_path)],
                  enforce_eager=eager)
        for name, path in adapters.items():
            llm.load_adapter(name, str(path))
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        outs[eager] = [o.token_ids for o in llm.generate(prompts, params, adapters=names)]
        outs[eager] += [o.token_ids for o in llm.generate(prompts[:3], params, adapters=names[:3])]
        if not eager:
            assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.graphs
            assert llm.engine.runner.step_graphs is not None and llm.engine.runner.step_graphs.graphs
        assert_no_leaks(llm.engine)
    assert outs[True] == outs[False]
