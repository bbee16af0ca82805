"""Engine throughput on a GPU, every figure beside its byte floor measured in the same run.

Random-weight models of real shapes (no hub access), bf16, greedy, EOS ignored, all requests
submitted at once (one ``generate`` call). Cases:
  decode1      Qwen3-0.6B shape, batch-1 decode (16-token prompt, 512 generated): ms/token
  b32          Qwen3-0.6B shape, 32 x 128 in / 128 out; graphs and eager
  graphs_vs_eager  batch 1, 8, 32, 128, 256 (128 in / 128 out), CUDA graphs vs eager
  lora         LoRA enabled but idle, 1 adapter, N distinct adapters (rank 16, all 7 projections), with
               LoRALinear.mode as the server runs it
  lora_fused, lora_overlap, lora_serial   the same adapters in one LoRALinear.mode each (fused: shrink and
               expand in one kernel; overlap: two kernels, the shrink on a side stream beside the base GEMM
               in decode graphs; serial: two kernels in line)
  llama8b      Llama-3-8B shape, batch-1 decode
  structured   Qwen3-0.6B shape, 32 x 128/128, every request under a JSON schema vs none (the demo
               model's byte-level tokenizer, so that JSON can be spelled), same run
  llama8b_lora Llama-3-8B shape, 32 x 128 in / 128 out, base and with 32 distinct rank-16 adapters
  tp           Llama-3-8B shape, 32 x 128 in / 128 out at tensor_parallel_size 1 and 2, base and with
               32 distinct adapters (skipped with fewer than 2 GPUs; the TP-2 floor is the TP-1 floor / 2)
  lora_many    Qwen3-0.6B shape, 1000 registered rank-16 adapters, 512 x 128/128 drawn Zipf(1), max_loras 64,
               vs the same run over 64 adapters all resident; slot and CPU-cache hit rates (bench/lora_residency.py)
  lora_loads   Llama-3-8B shape, 32 streams decoding while 50 new rank-16 adapters (on disk only) get one
               request each, one after another: p50 request -> first token, streams' p99 ITL vs without loads
Floor: weights + live K/V (+ distinct adapters' A/B) read once per decode step at the copy
bandwidth measured in this run, plus prefill FLOPs at the measured matmul rate (bench/floors.py).
Prints a table and one JSON line; writes bench/results/engine_throughput.json (and $OUT/ when set).
Usage: python bench/engine_throughput.py [--tiny] [--cases decode1,b32,...] [--profile]
(--tiny: a CPU smoke of the script and of the lora_many / lora_loads cases at toy sizes; no figures)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

sys.path.insert(0, str(Path(__file__).parent))
import floors  # noqa: E402
import lora_residency  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_CASES = {"lora": "", "lora_fused": "fused", "lora_overlap": "overlap", "lora_serial": "serial"}
# lora runs the default mode (overlap), so the full list leaves out lora_overlap: the same runs again
ALL_CASES = ("decode1", "b32", "graphs_vs_eager", "lora", "lora_fused", "lora_serial", "structured", "llama8b",
             "llama8b_lora", "tp", "lora_many", "lora_loads")
# 40+ strings: at least 130 bytes, so every constrained request runs its whole 128 tokens
STRUCTURED_SCHEMA = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string"},
                                                                "minItems": 40}},
                     "required": ["words"], "additionalProperties": False}


def model_config(arch: str, shape: dict) -> PretrainedConfig:
    """A Llama or Qwen3 HF config of ``shape`` (eos = the tokenizer's ``<eos id>`` token)."""
    if arch == "llama":
        return LlamaConfig(**shape, max_position_embeddings=8192, architectures=["LlamaForCausalLM"],
                           bos_token_id=1, eos_token_id=2)
    return Qwen3Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                       architectures=["Qwen3ForCausalLM"], eos_token_id=0)


def write_model(root: Path, shape: dict, device: str, n_adapters: int, arch: str = "qwen3", rank: int = 16
                ) -> tuple[Path, list[Path]]:
    """``root/model`` (bf16 random weights + a word-level tokenizer of ``<i>`` tokens) and ``root/a0..``
    (random rank-``rank`` PEFT adapters on all 7 projections)."""
    from peft import LoraConfig, get_peft_model

    cfg = model_config(arch, shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(root / "model")
    eos = f"<{cfg.eos_token_id}>"
    vocab = {f"<{i}>": i for i in range(shape["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=eos)), eos_token=eos)
    tok.save_pretrained(root / "model")
    adapters = []
    for i in range(n_adapters):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                      init_lora_weights=False))
        peft_model.save_pretrained(str(root / f"a{i}"))
        adapters.append(root / f"a{i}")
        model = peft_model.unload()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return root / "model", adapters


def byte_tokenizer_copy(model: Path) -> Path:
    """``model``'s weights beside the demo model's byte-level tokenizer (so that JSON can be spelled)."""
    demo = Path(__file__).parents[1] / "backend" / "demo" / "model"
    spelled = model.parent / "model_bytes"
    if spelled.exists():
        return spelled
    spelled.mkdir()
    for f in model.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (spelled / f.name).symlink_to(f)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (spelled / f).write_bytes((demo / f).read_bytes())
    return spelled


ENGINE_ARGS: dict = {}  # engine options of every run (--max-capture-tokens)


class Run:
    """One engine configuration measured on one workload."""

    def __init__(self, model_dir: Path, shape: dict, ceilings: tuple[float, float], **engine):
        from loraplex import LLM

        self.shape, self.bw, self.flops = shape, *ceilings
        self.llm = LLM(str(model_dir), dtype="bfloat16", max_lora_rank=16, **{**ENGINE_ARGS, **engine})

    def measure(self, batch: int, prompt: int, gen: int, names: list[str | None] | None = None,
                profile: bool = False, structured: dict | None = None) -> dict:
        from loraplex import SamplingParams

        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1, 250, (prompt,), generator=g).tolist() for _ in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=gen, min_tokens=gen, ignore_eos=True,
                                structured_outputs=structured)
        names = names or [None] * batch
        # warm-up on the timed run's own shapes (its prefill steps and decode bucket, its adapters in their
        # slots) but other prompts, so that nothing of the timed run is in the prefix cache: first-use
        # costs (kernel compiles for new row counts, allocator growth) stay out of the timed run
        other = [torch.randint(250, 500, (prompt,), generator=g).tolist() for _ in range(batch)]
        self.llm.generate(other, params, adapters=names)
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = self.llm.generate(prompts, params, adapters=names)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        assert all(len(o.token_ids) == gen for o in outs)
        distinct = len({n for n in names if n is not None})
        adapter_bytes = distinct * floors.lora_bytes(self.shape, 16)
        floor = floors.floor_seconds(self.shape, [prompt] * batch, [gen] * batch, self.bw, self.flops, adapter_bytes)
        res = {"batch": batch, "prompt": prompt, "gen": gen, "tok_s": round(batch * gen / dt, 1),
               "ms_per_step": round(1000 * dt / gen, 3), "floor_ms_per_step": round(1000 * floor / gen, 3),
               "pct_of_floor": round(100 * floor / dt, 1), "seconds": round(dt, 3)}
        if profile:
            res["profile"] = profile_steps(self.llm, prompts, params, names)
        return res

    def graph_info(self) -> dict:
        runner = self.llm.engine.runner
        info = {}
        for name, graphs in (("", runner.graphs), ("step_", getattr(runner, "step_graphs", None))):
            if graphs is not None:
                info.update({f"{name}graphs": len(graphs.graphs), f"{name}capture_s": round(graphs.capture_seconds, 2),
                             f"{name}graph_MiB": round(graphs.graph_memory_bytes / 2**20, 1)})
        return info

    def close(self) -> None:
        shutdown = getattr(self.llm.engine, "shutdown", None)  # tensor parallelism: stop the workers
        if shutdown is not None:
            shutdown()
        del self.llm
        torch.cuda.empty_cache()


def profile_steps(llm, prompts, params, names) -> dict:
    """Host time per step (schedule, runner, output processing) and GPU busy time per step."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    timers = {"schedule": 0.0, "launch": 0.0, "process": 0.0}
    originals = {}
    for name, obj, attr in (("schedule", engine.scheduler, "schedule"), ("launch", engine.runner, "launch"),
                            ("process", engine, "_process")):
        fn = getattr(obj, attr)
        originals[(obj, attr)] = fn

        def timed(*a, _fn=fn, _name=name, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                timers[_name] += time.perf_counter() - t
        setattr(obj, attr, timed)
    steps0 = engine.stats.num_steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        llm.generate(prompts, params, adapters=names)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    for obj, attr in originals:
        vars(obj).pop(attr, None)  # the class's own method again
    steps = max(1, engine.stats.num_steps - steps0)
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3  # ms
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=18)
    print(table)
    return {"steps": steps, "wall_ms_per_step": round(1000 * wall / steps, 3),
            "gpu_busy_ms_per_step": round(gpu / steps, 3),
            **{f"{k}_ms_per_step": round(1000 * v / steps, 3) for k, v in timers.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a CPU smoke test of the script itself (and of "
                    "lora_many / lora_loads at toy sizes when --cases names them; no figures)")
    ap.add_argument("--cases", default=",".join(ALL_CASES))
    ap.add_argument("--no-defer-expand", action="store_true",
                    help="LoRA expands in their own kernels (LoRALinear.defer_expand off), to compare")
    ap.add_argument("--no-early-shrink", action="store_true",
                    help="LoRA shrinks in their own kernels (LoRALinear.shrink_early off), to compare")
    ap.add_argument("--max-capture-tokens", type=int, default=None,
                    help="the engines' max_capture_tokens (default: the engine's; 0 = decode graphs only)")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="torch.profiler + host timers on the b32 case")
    ap.add_argument("--graphs-only", action="store_true", help="decode1 without its eager twin (short budgets)")
    ap.add_argument("--out", default="engine_throughput.json", help="result file name (bench/results/, $OUT)")
    ap.add_argument("--many-adapters", type=int, default=1000, help="lora_many: adapters registered")
    ap.add_argument("--many-files", type=int, default=200, help="lora_many: distinct weight files they share")
    ap.add_argument("--many-cpu-loras", type=int, default=0, help="lora_many: max_cpu_loras (0 = every adapter)")
    ap.add_argument("--loads", type=int, default=50, help="lora_loads: new adapters loaded under traffic")
    args = ap.parse_args()
    cases = args.cases.split(",")
    if args.no_defer_expand:
        from loraplex.backend.layers.lora import LoRALinear

        LoRALinear.defer_expand = False
    if args.no_early_shrink:
        from loraplex.backend.layers.lora import LoRALinear

        LoRALinear.shrink_early = False
    if args.max_capture_tokens is not None:
        ENGINE_ARGS["max_capture_tokens"] = args.max_capture_tokens
    if args.tiny:
        return smoke(cases)
    bw, flops = floors.copy_bandwidth(), floors.matmul_flops()
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "copy_GBps": round(bw / 1e9), "matmul_TFLOPs": round(flops / 1e12)}
    with tempfile.TemporaryDirectory() as tmp:
        n = args.adapters if set(LORA_CASES) & set(cases) else int("lora_many" in cases)
        qwen, adapters = write_model(Path(tmp) / "qwen", QWEN3_06B, "cuda", n)
        run_qwen_cases(res, qwen, adapters, cases, (bw, flops), args)
        save(res, args.out)
        if "lora_many" in cases:
            res["lora_many"] = lora_residency.lora_many(qwen, adapters[0], Path(tmp), False, args.many_adapters,
                                                        args.many_files, args.many_cpu_loras)
            save(res, args.out)
        if {"llama8b", "lora_loads", "llama8b_lora"} & set(cases):  # one Llama-3-8B write serves them all
            n = args.adapters if "llama8b_lora" in cases else int("lora_loads" in cases)
            llama, templates = write_model(Path(tmp) / "llama", LLAMA3_8B, "cuda", n, arch="llama")
        if "lora_loads" in cases:
            res["lora_loads"] = lora_residency.lora_loads(llama, templates[0], Path(tmp), False, args.loads)
            save(res, args.out)
        if "llama8b" in cases:
            run = Run(llama, LLAMA3_8B, (bw, flops), max_num_seqs=1, enable_lora=False, max_model_len=2048)
            res["llama8b_decode1"] = run.measure(1, 16, 256)
            run.close()
            save(res, args.out)
        if "llama8b_lora" in cases:
            run_tp_case(res, Path(tmp) / "llama", (bw, flops), args, sizes=(1,), written=(llama, templates))
        if "tp" in cases:
            run_tp_case(res, Path(tmp) / "llama_tp", (bw, flops), args)
    report(res, args.out)


def run_tp_case(res: dict, root: Path, ceilings, args, sizes: tuple[int, ...] = (1, 2),
                written: tuple[Path, list[Path]] | None = None) -> None:
    """Llama-3-8B shape decode throughput at each TP size, without and with 32 distinct adapters
    (``written``: the model and adapters under ``root`` when already written)."""
    if torch.cuda.device_count() < max(sizes):
        res["tp"] = {"skipped": f"needs 2 GPUs, {torch.cuda.device_count()} visible"}
        print("tp: skipped (fewer than 2 GPUs)")
        return
    n = args.adapters
    model, adapters = written or write_model(root, LLAMA3_8B, "cuda", n, arch="llama")
    for tp in sizes:
        for key, names in ((f"tp{tp}_base", None), (f"tp{tp}_lora{n}", [f"a{i % n}" for i in range(32)])):
            engine = dict(tensor_parallel_size=tp, max_num_seqs=32, max_model_len=2048,
                          enable_lora=names is not None, max_loras=max(1, n), adapter_roots=[str(root)])
            run = Run(model, LLAMA3_8B, ceilings, **engine)
            if names is not None:
                for i, path in enumerate(adapters):
                    run.llm.load_adapter(f"a{i}", str(path))
            r = run.measure(32, 128, 128, names=names)
            if names is not None:
                r["vs_base"] = round(r["tok_s"] / res[f"tp{tp}_base"]["tok_s"], 3)
            if tp > 1:  # each rank reads 1/tp of the bytes, in parallel (all-reduce time not counted)
                r["floor_ms_per_step"] = round(r["floor_ms_per_step"] / tp, 3)
                r["pct_of_floor"] = round(100 * r["floor_ms_per_step"] / r["ms_per_step"], 1)
            res[key] = {**r, **run.graph_info()}
            run.close()
            save(res, args.out)


def run_qwen_cases(res: dict, model: Path, adapters: list[Path], cases: list[str], ceilings, args) -> None:
    s = QWEN3_06B
    if "decode1" in cases:
        for eager in (False,) if args.graphs_only else (False, True):
            run = Run(model, s, ceilings, max_num_seqs=1, enable_lora=False, enforce_eager=eager, max_model_len=2048)
            res["decode1" + ("_eager" if eager else "")] = {**run.measure(1, 16, 512), **run.graph_info()}
            run.close()
        save(res, args.out)
    if "b32" in cases:
        run = Run(model, s, ceilings, max_num_seqs=32, enable_lora=False, max_model_len=2048)
        res["b32"] = {**run.measure(32, 128, 128, profile=args.profile), **run.graph_info()}
        run.close()
        save(res, args.out)
    if "graphs_vs_eager" in cases:
        for batch in (1, 8, 32, 128, 256):
            for eager in (False, True):
                run = Run(model, s, ceilings, max_num_seqs=batch, enable_lora=False, enforce_eager=eager,
                          max_model_len=1024, max_num_batched_tokens=max(2048, batch * 128))
                res[f"b{batch}_{'eager' if eager else 'graphs'}"] = run.measure(batch, 128, 128)
                run.close()
    if "structured" in cases:
        run = Run(byte_tokenizer_copy(model), s, ceilings, max_num_seqs=32, enable_lora=False, max_model_len=2048)
        res["structured_off"] = run.measure(32, 128, 128)
        res["structured_json"] = run.measure(32, 128, 128, structured={"json": STRUCTURED_SCHEMA})
        res["structured_json"]["vs_unconstrained"] = round(
            res["structured_json"]["tok_s"] / res["structured_off"]["tok_s"], 3)
        run.close()
        save(res, args.out)
    if set(LORA_CASES) & set(cases):
        from loraplex.backend.layers.lora import LoRALinear

        n = len(adapters)
        Case = tuple[str, list[str | None], int, int, str]  # key, adapter of each request, loaded, max_loras, mode
        one: list[str | None] = ["a0"] * 32
        spread: list[str | None] = [f"a{i % n}" for i in range(32)]
        default = LoRALinear.mode
        runs: list[Case] = [("lora_idle", [None] * 32, 1, 1, default)]
        for wanted, mode in LORA_CASES.items():
            if wanted in cases:
                suffix = f"_{mode}" if mode else ""
                runs += [("lora_1" + suffix, one, 1, 1, mode or default), (f"lora_{n}" + suffix, spread, n, n, mode or default)]
        for key, names, loaded, max_loras, mode in runs:
            LoRALinear.mode = mode  # type: ignore[assignment]
            try:
                run = Run(model, s, ceilings, max_num_seqs=32, max_loras=max_loras, max_model_len=2048,
                          adapter_roots=[str(model.parent)])
                for i, path in enumerate(adapters[:loaded]):
                    run.llm.load_adapter(f"a{i}", str(path))
                res[key] = run.measure(32, 128, 128, names=names, profile=args.profile)
                res[key]["lora_mode"] = mode
                run.close()
            finally:
                LoRALinear.mode = default
            if key != "lora_idle" and "lora_idle" in res:
                res[key]["vs_idle"] = round(res[key]["tok_s"] / res["lora_idle"]["tok_s"], 3)
            save(res, args.out)  # each run as it ends (a short device call keeps what finished)


def save(res: dict, name: str) -> None:
    """Writes what is measured so far (a later case that fails loses nothing)."""
    for folder in filter(None, (os.environ.get("OUT"), str(Path(__file__).parent / "results"))):
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, name).write_text(json.dumps(res, indent=1))


def report(res: dict, name: str) -> None:
    print(f"{'case':<22} {'tok/s':>10} {'ms/step':>9} {'floor ms':>9} {'% floor':>8}")
    for key, v in res.items():
        if isinstance(v, dict) and "tok_s" in v:
            print(f"{key:<22} {v['tok_s']:>10} {v['ms_per_step']:>9} {v['floor_ms_per_step']:>9} {v['pct_of_floor']:>8}")
    print(json.dumps(res))
    save(res, name)


def smoke(cases: list[str]) -> None:
    """CPU: the script's model writing and engine path on a tiny model, and the adapter residency cases
    at toy sizes (no figures; prints their result as one JSON line, saves nothing)."""
    from loraplex import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = write_model(Path(tmp), TINY, "cpu", 1)
        llm = LLM(str(model), max_num_seqs=4, max_lora_rank=16, adapter_roots=[tmp])
        llm.load_adapter("a0", str(adapters[0]))
        outs = llm.generate([[1, 2, 3]] * 4, SamplingParams(temperature=0, max_tokens=4, min_tokens=4,
                                                            ignore_eos=True), adapters=[None, "a0", None, "a0"])
        assert all(len(o.token_ids) == 4 for o in outs)
        del llm
        res: dict = {}
        if "lora_many" in cases:
            res["lora_many"] = lora_residency.lora_many(model, adapters[0], Path(tmp), True)
        if "lora_loads" in cases:
            res["lora_loads"] = lora_residency.lora_loads(model, adapters[0], Path(tmp), True)
        print("smoke ok")
        print(json.dumps(res))


if __name__ == "__main__":
    main()
