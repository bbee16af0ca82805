"""Engine throughput on a GPU: output tokens/s of the whole engine, base vs LoRA, at a fixed shape.

Random-weight Qwen3-0.6B-shaped model (no hub access), bf16, greedy, EOS ignored,
B prompts of P tokens, G generated tokens each. Cases, all in one run:
  base        enable_lora=False (decode in CUDA graphs)
  base-eager  the same without CUDA graphs
  lora-idle   LoRA enabled, every request on the base model
  lora-1      every request on one rank-16 adapter (all 7 projections)
  lora-N      N distinct rank-16 adapters mixed in one batch (max_loras=N)
Prints one JSON line (and writes $OUT/engine_throughput.json when OUT is set).
Usage: python bench/engine_throughput.py [--tiny]   (--tiny: a CPU smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_model(root: Path, shape: dict, device: str, n_adapters: int) -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model

    cfg = Qwen3Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                      architectures=["Qwen3ForCausalLM"], eos_token_id=0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(root / "model")
    vocab = {f"<{i}>": i for i in range(shape["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<0>")),
                                  eos_token="<0>")
    tok.save_pretrained(root / "model")
    adapters = []
    for i in range(n_adapters):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                      init_lora_weights=False))
        peft_model.save_pretrained(root / f"a{i}")
        adapters.append(root / f"a{i}")
        model = peft_model.unload()
    del model
    torch.cuda.empty_cache() if device == "cuda" else None
    return root / "model", adapters


def measure(model_dir: Path, adapters: list[Path], names: list[str | None], args, **engine) -> dict:
    from loraplex import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="bfloat16", max_num_seqs=args.batch, max_lora_rank=16,
              max_num_batched_tokens=max(2048, args.batch * args.prompt), **engine)
    for i, path in enumerate(adapters):
        llm.load_adapter(f"a{i}", str(path))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 500, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    params = [SamplingParams(temperature=0.0, max_tokens=args.gen, min_tokens=args.gen, ignore_eos=True)] * args.batch
    llm.generate(prompts[:4], params[:4], adapters=names[:4])  # warm-up
    sync()
    t = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        outs = prof.runcall(llm.generate, prompts, params, adapters=names)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        outs = llm.generate(prompts, params, adapters=names)
    sync()
    dt = time.perf_counter() - t
    assert all(len(o.token_ids) == args.gen for o in outs)
    result = {"tok_s": round(args.batch * args.gen / dt, 1), "seconds": round(dt, 3)}
    del llm
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the base case only")
    args = ap.parse_args()
    if args.tiny:
        args.batch, args.prompt, args.gen, args.adapters = 4, 8, 4, 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.adapters
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = write_model(Path(tmp), TINY if args.tiny else QWEN3_06B, device, n)
        base = [None] * args.batch
        res = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "torch": torch.__version__, "batch": args.batch, "prompt": args.prompt, "gen": args.gen,
               "date": time.strftime("%Y-%m-%d")}
        res["base"] = measure(model_dir, [], base, args, enable_lora=False)
        if args.profile:
            print(json.dumps(res))
            return
        res["base_eager"] = measure(model_dir, [], base, args, enable_lora=False, enforce_eager=True)
        res["lora_idle"] = measure(model_dir, adapters[:1], base, args, max_loras=1)
        res["lora_1"] = measure(model_dir, adapters[:1], ["a0"] * args.batch, args, max_loras=1)
        res[f"lora_{n}"] = measure(model_dir, adapters, [f"a{i % n}" for i in range(args.batch)], args, max_loras=n)
    print(json.dumps(res))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "engine_throughput.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
