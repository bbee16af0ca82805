"""Adapter loads on CUDA: slot writes on the fill stream, ordered before the steps that read them.

Mixed-adapter batches stay token-identical to HF + PEFT (float32) while adapters are re-read from
disk, written into slots on the side stream, evicted and hot-loaded, with decode CUDA graphs on.
"""

from __future__ import annotations

import copy
import random
import threading
import time
from typing import Any

import pytest
import torch
from peft import PeftModel

from loraplex import LLM, SamplingParams
from loraplex.lora.peft import LoRAWeights, load_peft_adapter
from loraplex.lora.slots import LoRASlots, targets_from_spec
from tests.engine_factory import assert_no_leaks, hf_greedy, load_hf, write_tiny_model
from tests.lora_factory import make_peft_adapter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ADAPTERS = {  # name -> (rank, targets)
    "q2": (2, ["q_proj", "v_proj"]), "attn8": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp4": (4, ["gate_proj", "up_proj", "down_proj"]), "all16": (16, "all-linear"),
    "o4": (4, ["o_proj"]), "all8": (8, "all-linear"), "late1": (16, ["down_proj", "q_proj"]),
    "late2": (4, "all-linear"),
}
MAX_NEW = 12


def test_slot_fill_is_ordered_before_the_compute_stream() -> None:
    """A big fill enqueued on the side stream, then read at once on the compute stream after
    ``order_before``: the reader sees every byte of it."""
    shapes = {m: (2048, 2048) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    shapes.update(gate_proj=(2048, 8192), up_proj=(2048, 8192), down_proj=(8192, 2048))
    slots = LoRASlots(targets_from_spec(4, shapes), max_loras=2, max_rank=16, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(0)
    weights = {(layer, m): (torch.randn(16, i, generator=g), torch.randn(o, 16, generator=g))
               for layer in range(4) for m, (i, o) in shapes.items()}
    w = slots.host_copy(LoRAWeights("x", "x", 16, 16.0, False, 1.0, frozenset(shapes), weights, 0))
    assert all(a.is_pinned() and a.dtype == torch.bfloat16 for pair in w.weights.values() for a in pair)
    for _ in range(3):
        torch.cuda._sleep(50_000_000)  # a busy compute stream: the fill goes behind it, the reads behind the fill
        fill = slots.fill(1, w)
        fill.order_before()
        a = slots.buffers(0, "qkv_proj")[0][1, :16].float().cpu()  # q_proj's A
        b = slots.buffers(3, "down_proj")[1][1, :, :16].float().cpu()
        assert torch.equal(a, w.weights[(0, "q_proj")][0].float())
        assert torch.equal(b, w.weights[(3, "down_proj")][1].float())
        assert fill.done() and slots.scales[1].item() == 1.0
        slots.clear(1)
    torch.cuda.synchronize()
    assert not slots.buffers(0, "qkv_proj")[0][1].any() and slots.scales[1].item() == 0.0


@pytest.mark.parametrize("rank", [16, 8])
def test_staged_fill_writes_what_a_cpu_load_writes(rank: int) -> None:
    """The CUDA fill (one transfer of the pinned host copy, one multi-tensor copy, strided B views
    when the rank is below the slot's) leaves every buffer as the plain CPU write does, over a slot
    that held another adapter before."""
    shapes = {m: (256, 256) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    shapes.update(gate_proj=(256, 512), up_proj=(256, 512), down_proj=(512, 256))
    targets = targets_from_spec(3, shapes)
    g = torch.Generator().manual_seed(rank)

    def adapter(name: str, r: int, modules: list[str]) -> LoRAWeights:
        weights = {(layer, m): (torch.randn(r, shapes[m][0], generator=g), torch.randn(shapes[m][1], r, generator=g))
                   for layer in range(3) for m in modules}
        return LoRAWeights(name, name, r, 2.0 * r, False, 2.0, frozenset(modules), weights, 0)

    old, new = adapter("old", 16, list(shapes)), adapter("new", rank, ["q_proj", "v_proj", "down_proj"])
    gpu = LoRASlots(targets, max_loras=3, max_rank=16, dtype=torch.bfloat16, device="cuda")
    cpu = LoRASlots(targets, max_loras=3, max_rank=16, dtype=torch.bfloat16, device="cpu")
    for slots in (gpu, cpu):
        slots.load(2, slots.host_copy(old))
        slots.load(2, slots.host_copy(new))
    torch.cuda.synchronize()
    for t in targets:
        for got, want in zip(gpu.buffers(t.layer, t.group), cpu.buffers(t.layer, t.group), strict=True):
            assert torch.equal(got.cpu(), want), (t.layer, t.group)
    assert torch.equal(gpu.scales.cpu(), cpu.scales) and gpu.ranks == cpu.ranks


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("loading-gpu")
    base_dir = write_tiny_model(root / "base", "llama")
    hf = load_hf(base_dir)
    dirs = {name: make_peft_adapter(hf, root / name, r=r, alpha=2 * r, targets=targets, seed=i + 1)
            for i, (name, (r, targets)) in enumerate(ADAPTERS.items())}
    refs = {None: hf, **{n: PeftModel.from_pretrained(copy.deepcopy(hf), d).eval() for n, d in dirs.items()}}
    return {"root": root, "base": base_dir, "dirs": dirs, "refs": refs}


def slowed(llm: LLM, delay: float) -> None:
    """Reads from disk take ``delay`` seconds more, so that loads overlap the steps."""
    def read(name: str, *args: Any) -> LoRAWeights:
        time.sleep(delay)
        return load_peft_adapter(name, *args)
    llm.engine.adapters.read_source = read


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_mixed_batches_match_peft_while_adapters_load(world: dict[str, Any], eager: bool) -> None:
    llm = LLM(str(world["base"]), dtype="float32", device="cuda", kv_cache_memory_bytes=2**26, max_lora_rank=16,
              max_loras=3, max_cpu_loras=2, max_num_seqs=8, enforce_eager=eager, adapter_roots=[str(world["root"])])
    early = [n for n in ADAPTERS if not n.startswith("late")]
    for name in early:
        llm.load_adapter(name, str(world["dirs"][name]))
    slowed(llm, 0.02)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randrange(2, 24))] for _ in range(48)]
    names: list[str | None] = [rng.choice([*early, None]) for _ in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

    def hot_load() -> None:  # operators load adapters while the engine serves
        time.sleep(0.05)
        for name in ("late1", "late2"):
            llm.engine.adapters.register(name, str(world["dirs"][name]))

    loader = threading.Thread(target=hot_load)
    loader.start()
    outs = llm.generate(prompts, params, adapters=names)
    loader.join()
    late_names: list[str | None] = [rng.choice(["late1", "late2", *early[:2]]) for _ in prompts[:16]]
    outs += llm.generate(prompts[:16], params, adapters=late_names)
    for out, prompt, name in zip(outs, prompts + prompts[:16], names + late_names, strict=True):
        assert out.token_ids == hf_greedy(world["refs"][name], prompt, MAX_NEW, None), name
    counts = llm.engine.adapters.counts()
    assert counts.slot_evictions > 0 and counts.source_loads > len(ADAPTERS)  # evicted and re-read
    assert sum(counts.load_times["slot"][0]) > 0  # slots written in the background
    assert llm.engine.adapters.consistency_errors() == []
    assert_no_leaks(llm.engine)


def test_pinned_host_cache_and_side_stream(world: dict[str, Any]) -> None:
    llm = LLM(str(world["base"]), dtype="bfloat16", device="cuda", kv_cache_memory_bytes=2**26, max_lora_rank=16,
              adapter_roots=[str(world["root"])])
    info = llm.load_adapter("all16", str(world["dirs"]["all16"]))
    assert info.state == "cached"
    version = llm.engine.adapters.acquire("all16")
    assert version.weights is not None
    assert all(a.is_pinned() and a.dtype == torch.bfloat16 for pair in version.weights.weights.values() for a in pair)
    llm.engine.adapters.release(version)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4), adapters=["all16"])
    assert len(out[0].token_ids) == 4
    slots = llm.engine.adapters.slots
    assert slots._fill_stream is not None and slots._fill_stream != torch.cuda.current_stream()
