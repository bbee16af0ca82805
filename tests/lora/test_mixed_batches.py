"""Mixed-adapter batches: each request's logits in one batched engine step match HF transformers +
PEFT run on that request alone (float32, max abs diff <= 1e-4), and greedy outputs are identical,
also when ``max_loras`` is smaller than the number of adapters in use."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loraplex import LLM, SamplingParams
from tests.engine_factory import assert_no_leaks, hf_greedy, load_hf, write_tiny_model
from tests.lora_factory import TMP_ROOTS, make_peft_adapter

ADAPTERS = {  # name -> (rank, alpha, targets, rslora)
    "attn8": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "mlp4": (4, 8, ["gate_proj", "up_proj", "down_proj"], False),
    "all16-rs": (16, 32, "all-linear", True),
    "qv2": (2, 4, ["q_proj", "v_proj"], False),
}
PROMPTS = [[5, 9, 17, 33, 2], [40, 41], [7] * 19, [100, 3, 8, 21, 60, 61, 62], [12, 13, 14], [90] * 9,
           [15, 25, 35, 45, 55, 65, 75, 85, 95, 105, 115], [3, 4]]
ASSIGN = ["attn8", None, "mlp4", "all16-rs", "qv2", None, "attn8", "all16-rs"]
MAX_NEW = 8


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"mixed-{request.param}")
    base_dir = write_tiny_model(root / "base", request.param)
    hf = load_hf(base_dir)
    dirs = {}
    for i, (name, (r, alpha, targets, rs)) in enumerate(ADAPTERS.items()):
        dirs[name] = make_peft_adapter(hf, root / name, r=r, alpha=alpha, targets=targets, use_rslora=rs,
                                       seed=i + 1)
    refs = {None: hf}
    for name, d in dirs.items():
        refs[name] = PeftModel.from_pretrained(copy.deepcopy(hf), d).eval()
    return base_dir, dirs, refs


def _llm(base_dir, dirs, **kw) -> LLM:
    llm = LLM(str(base_dir), dtype="float32", kv_cache_memory_bytes=2**26, max_lora_rank=16,
              adapter_roots=TMP_ROOTS, **kw)
    for name, d in dirs.items():
        llm.load_adapter(name, str(d))
    return llm


def test_logits_of_one_batched_step_match_peft_alone(setup):
    base_dir, dirs, refs = setup
    llm = _llm(base_dir, dirs, max_loras=4)
    captured: list[torch.Tensor] = []
    runner = llm.engine.runner
    original = runner._sample  # the sampling rows' logits, from every path (eager, step graph)
    runner._sample = lambda logits, *a: captured.append(logits.float()) or original(logits, *a)  # type: ignore[method-assign]
    try:
        llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=1), adapters=ASSIGN)
    finally:
        runner._sample = original  # type: ignore[method-assign]
    assert len(captured) == 1, "every request must be prefilled in one step"
    logits = captured[0]
    for row, (prompt, name) in enumerate(zip(PROMPTS, ASSIGN, strict=True)):
        with torch.no_grad():
            ref = refs[name](torch.tensor([prompt])).logits[0, -1].float()
        diff = (logits[row].cpu() - ref).abs().max().item()
        assert diff <= 1e-4, f"request {row} on {name}: max abs diff {diff}"
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("max_loras", [4, 2, 1])
def test_greedy_outputs_match_peft(setup, max_loras):
    base_dir, dirs, refs = setup
    llm = _llm(base_dir, dirs, max_loras=max_loras)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), adapters=ASSIGN)
    eos = refs[None].config.eos_token_id
    for out, prompt, name in zip(outs, PROMPTS, ASSIGN, strict=True):
        assert out.token_ids == hf_greedy(refs[name], prompt, MAX_NEW, eos), name
        assert out.adapter == name
    counts = llm.engine.adapters.counts()
    assert counts.lora_slots_used <= max_loras
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize(("shrink_early", "defer_expand"), [(False, False), (False, True), (True, False)])
def test_greedy_outputs_match_peft_with_lora_ops_in_their_layer(setup, shrink_early, defer_expand,
                                                                 monkeypatch):
    """The norms' early shrinks (``LoRALinear.shrink_early``) and the deferred expands switched off in
    turn: each arrangement of the same LoRA ops gives HF + PEFT's tokens (the default, both on, is
    test_greedy_outputs_match_peft)."""
    from loraplex.backend.layers.lora import LoRALinear

    monkeypatch.setattr(LoRALinear, "shrink_early", shrink_early)
    monkeypatch.setattr(LoRALinear, "defer_expand", defer_expand)
    base_dir, dirs, refs = setup
    llm = _llm(base_dir, dirs, max_loras=4)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), adapters=ASSIGN)
    eos = refs[None].config.eos_token_id
    for out, prompt, name in zip(outs, PROMPTS, ASSIGN, strict=True):
        assert out.token_ids == hf_greedy(refs[name], prompt, MAX_NEW, eos), name


@pytest.mark.parametrize("budget", [16, 64])
def test_step_graph_buffers_match_peft(setup, budget):
    """The captured prefill/mixed step's padded forward (token buckets, the padding sequence, the tile
    map, LoRA slots on the device, logits of the sampling rows gathered), run eagerly on the CPU,
    gives HF + PEFT's greedy tokens; with a small token budget, chunked prefills mix with decodes."""
    from loraplex.backend.engine.cuda_graphs import StepGraphs

    base_dir, dirs, refs = setup
    llm = _llm(base_dir, dirs, max_loras=2, max_num_batched_tokens=budget, max_num_seqs=8)
    runner = llm.engine.runner
    graphs = StepGraphs(runner.model, runner.block_size, len(runner.kv_cache[0, 0]) - 1, runner.table.block_table.shape[1],
                        8, budget, runner.device, True, runner.last_sampled)
    calls: list[int] = []
    real_run = graphs.run
    graphs.run = lambda inputs, source: calls.append(len(inputs.input_ids)) or real_run(inputs, source)  # type: ignore[method-assign]
    runner.step_graphs = graphs
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), adapters=ASSIGN)
    eos = refs[None].config.eos_token_id
    for out, prompt, name in zip(outs, PROMPTS, ASSIGN, strict=True):
        assert out.token_ids == hf_greedy(refs[name], prompt, MAX_NEW, eos), name
    assert len(calls) >= 2 and max(calls) <= budget and any(n not in graphs.buckets for n in calls)
    assert_no_leaks(llm.engine)
