"""Build and train the built-in demo model and its LoRA adapters.

Reproduces ``backend/demo/model`` and ``backend/demo/adapters/*`` (see the
docstring of ``loraplex.backend.demo`` for the formats): a byte-level
tokenizer with a Qwen3-like chat template, a tiny ``Qwen3ForCausalLM`` trained
to echo the user's text, then one PEFT LoRA adapter per task trained on the
frozen base. Each stage trains until teacher-forced exact match on a fixed
evaluation set reaches the target (equivalent to greedy exact match), then
anneals the learning rate; the script ends with greedy ``generate`` accuracy
on held-out inputs for every behaviour.

    python scripts/train_demo.py --device cuda --out backend/demo

``--device cpu`` works but is slow (about a second a step on two cores; the
stages take a few thousand steps each). The shipped weights were trained on
one H100 with ``--device cuda --threads 1 --workers 2..3``: the base alone
(``--only base --stage-seconds 80``), then the adapters in parallel processes
(``--only TASK --stage-seconds 160..170``) on that base. The base and the
``think`` adapter came from an earlier revision of ``schedule`` that annealed
over a fifth (not two thirds) of the held steps; everything else is as here.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from loraplex.backend.demo import (
    DEMO_DIR,
    DEMO_MODEL_NAME,
    WEATHER_TOOL,
    expected_output,
    random_input,
    sample_inputs,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
VOCAB_SIZE = 272  # 265 tokens, padded to a multiple of 16
MAX_POSITIONS = 1024
PLACEHOLDER = "\x00"

CHAT_TEMPLATE = "".join(
    line.strip()
    for line in """
{%- macro render_content(content) -%}
  {%- if content is string -%}{{- content -}}
  {%- elif content -%}
    {%- for part in content -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(skip_first=false) -%}
{%- if tools -%}
  {{- '<|im_start|>system\\n' -}}
  {%- if messages and messages[0]['role'] == 'system' -%}
    {{- render_content(messages[0]['content']) + '\\n\\n' -}}
    {%- set ns.skip_first = true -%}
  {%- endif -%}
  {{- '# Tools\\n\\n<tools>\\n' -}}
  {%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}
  {{- '</tools>\\n\\nTo call a tool, reply <tool_call>\\n{\"name\": <name>, \"arguments\": <args>}\\n</tool_call><|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if not (loop.first and ns.skip_first) -%}
    {{- '<|im_start|>' + message['role'] + '\\n' + render_content(message['content']) -}}
    {%- if message['role'] == 'assistant' and message['tool_calls'] -%}
      {%- for call in message['tool_calls'] -%}
        {%- set call = call['function'] if call['function'] is defined else call -%}
        {%- if not loop.first or message['content'] -%}{{- '\\n' -}}{%- endif -%}
        {{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' -}}
        {%- if call['arguments'] is string -%}{{- call['arguments'] -}}
        {%- else -%}{{- call['arguments'] | tojson -}}{%- endif -%}
        {{- '}\\n</tool_call>' -}}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
  {%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}
""".splitlines()
)

HOLD_SHARE = 0.6  # of a stage's budget spent at the full learning rate, at most
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_CONFIGS: dict[str, dict[str, Any]] = {
    "reverse": {"r": 16, "lora_alpha": 32, "target_modules": ALL_PROJ},
    "upper": {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "think": {"r": 16, "lora_alpha": 16, "target_modules": ALL_PROJ, "use_rslora": True},
    "tools": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}


@dataclass(frozen=True)
class Stage:
    """One training stage: the base model (task None) or one adapter."""

    task: str | None
    lr: float
    max_steps: int
    tools_prob: float = 0.2
    no_think_prob: float = 0.2
    lora: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.task or "base"


STAGES: tuple[Stage, ...] = (
    Stage(None, lr=2e-3, max_steps=6000),
    Stage("reverse", lr=3e-3, max_steps=8000, lora=ADAPTER_CONFIGS["reverse"]),
    Stage("upper", lr=3e-3, max_steps=8000, lora=ADAPTER_CONFIGS["upper"]),
    Stage("think", lr=3e-3, max_steps=8000, lora=ADAPTER_CONFIGS["think"]),
    Stage("tools", lr=3e-3, max_steps=6000, tools_prob=0.5, lora=ADAPTER_CONFIGS["tools"]),
)


# ----------------------------------------------------------------------------- tokenizer


def byte_to_char() -> dict[int, str]:
    """The byte-level alphabet: printable Latin-1 bytes stand for themselves,
    the others are shifted to code points 256 and up (the GPT-2 convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: id b is byte b, then the special and added tokens."""
    vocab = {char: b for b, char in byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) <= VOCAB_SIZE
    return tokenizer


# ----------------------------------------------------------------------------- model


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, do_sample=False)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Variant:
    """How the prompt is rendered: with the weather tool or not, thinking or not."""

    tools: bool
    thinking: bool


def chat_kwargs(variant: Variant) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"add_generation_prompt": True}
    if variant.tools:
        kwargs["tools"] = [WEATHER_TOOL]
    if not variant.thinking:
        kwargs["enable_thinking"] = False
    return kwargs


class PromptBank:
    """Renders the chat template once per variant around a placeholder, then
    builds token sequences for many texts with one batched tokenizer call."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.frames: dict[Variant, tuple[str, str]] = {}
        for tools in (False, True):
            for thinking in (False, True):
                variant = Variant(tools, thinking)
                messages = [{"role": "user", "content": PLACEHOLDER}]
                rendered = tokenizer.apply_chat_template(messages, tokenize=False, **chat_kwargs(variant))
                prefix, suffix = str(rendered).split(PLACEHOLDER)
                self.frames[variant] = (prefix, suffix)

    def prompt_text(self, text: str, variant: Variant) -> str:
        prefix, suffix = self.frames[variant]
        return prefix + text + suffix

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def examples(
        self, task: str | None, texts: Sequence[str], variants: Sequence[Variant]
    ) -> tuple[list[list[int]], list[list[int]]]:
        prompts = self.encode([self.prompt_text(t, v) for t, v in zip(texts, variants, strict=True)])
        targets = [
            expected_output(task, t, enable_thinking=v.thinking) for t, v in zip(texts, variants, strict=True)
        ]
        eos = self.tokenizer.eos_token_id
        completions = [ids + [eos] for ids in self.encode(targets)]
        return prompts, completions


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels (-100 outside completions)."""
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def draw_batch(bank: PromptBank, stage: Stage, rng: random.Random, size: int) -> dict[str, torch.Tensor]:
    """One training batch; all of it with the tools block or none of it (keeps padding low)."""
    tools = rng.random() < stage.tools_prob
    texts = [random_input(rng) for _ in range(size)]
    variants = [Variant(tools, rng.random() >= stage.no_think_prob) for _ in range(size)]
    prompts, completions = bank.examples(stage.task, texts, variants)
    return collate(prompts, completions, bank.tokenizer.pad_token_id)


class BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches of one stage; each loader worker has its own seed."""

    def __init__(self, bank: PromptBank, stage: Stage, size: int, seed: int) -> None:
        super().__init__()
        self.bank, self.stage, self.size, self.seed = bank, stage, size, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(f"loraplex-demo-train-{self.stage.name}-{self.seed}-{worker}")
        while True:
            yield draw_batch(self.bank, self.stage, rng, self.size)


def batch_loader(
    bank: PromptBank, stage: Stage, args: TrainArgs, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    stream = BatchStream(bank, stage, args.batch_size, seed)
    workers = args.workers
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=args.device.type == "cuda",
        prefetch_factor=8 if workers else None,
    )
    return iter(loader)


def eval_batches(bank: PromptBank, task: str | None, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """A fixed evaluation set of held-out texts over all four prompt variants."""
    texts = sample_inputs(n, seed=seed)
    batches = []
    for k, variant in enumerate(
        Variant(tools, thinking) for tools in (False, True) for thinking in (True, False)
    ):
        chunk = texts[k::4]
        prompts, completions = bank.examples(task, chunk, [variant] * len(chunk))
        batches.append(collate(prompts, completions, bank.tokenizer.pad_token_id))
    return batches


# ----------------------------------------------------------------------------- training


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def loss_and_hits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean completion cross-entropy, and per sequence whether every completion
    token is the argmax (teacher-forced exact match = greedy exact match)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
    )
    wrong = (logits.argmax(-1) != labels) & (labels != -100)
    return loss, ~wrong.any(dim=1)


@torch.no_grad()
def forced_accuracy(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> float:
    model.eval()
    hits = torch.cat([loss_and_hits(model, to_device(b, device))[1].cpu() for b in batches])
    model.train()
    return hits.float().mean().item()


def lr_at(step: int, base_lr: float, warmup: int, anneal_from: int | None, anneal_steps: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if anneal_from is None:
        return base_lr
    return base_lr * max(0.0, 1.0 - (step - anneal_from) / anneal_steps)


@dataclass
class TrainArgs:
    device: torch.device
    batch_size: int
    eval_every: int
    target: float
    warmup: int = 100
    eval_size: int = 512
    workers: int = 0
    stage_seconds: float = float("inf")


def schedule(
    stage: Stage, args: TrainArgs, model: torch.nn.Module, evals: list[dict[str, torch.Tensor]]
) -> Iterator[float]:
    """Learning rates: warm up, hold until the evaluation set passes (or 60% of the
    stage's step or time budget is spent), then anneal linearly to zero over
    two thirds as many steps again (at least 200)."""
    step, anneal_from, anneal_steps = 0, None, 0
    hold_steps = int(stage.max_steps * HOLD_SHARE)
    deadline = time.time() + args.stage_seconds * HOLD_SHARE
    while anneal_from is None or step < anneal_from + anneal_steps:
        yield lr_at(step, stage.lr, args.warmup, anneal_from, anneal_steps)
        step += 1
        out_of_budget = step >= hold_steps or time.time() > deadline
        if anneal_from is None and (step % args.eval_every == 0 or out_of_budget):
            acc = forced_accuracy(model, evals, args.device)
            print(f"  [{stage.name}] step {step}: forced exact match {acc:.4f}", flush=True)
            if acc >= args.target or out_of_budget:
                anneal_from, anneal_steps = step, max(200, step * 2 // 3)


def train_stage(model: torch.nn.Module, stage: Stage, bank: PromptBank, args: TrainArgs, seed: int) -> float:
    """Train the model's trainable parameters on one stage; returns its final forced accuracy."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.0)
    batches = batch_loader(bank, stage, args, seed)
    evals = eval_batches(bank, stage.task, args.eval_size, seed=10_000 + seed)
    model.train()
    start, steps = time.time(), 0
    for steps, lr in enumerate(schedule(stage, args, model, evals), start=1):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, _ = loss_and_hits(model, to_device(next(batches), args.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if steps % 100 == 0:
            elapsed = time.time() - start
            print(
                f"  [{stage.name}] step {steps} loss {loss.item():.4f} lr {lr:.2e} {elapsed:.0f}s", flush=True
            )
    acc = forced_accuracy(model, evals, args.device)
    print(f"  [{stage.name}] done: {steps} steps in {time.time() - start:.0f}s, forced exact match {acc:.4f}")
    return acc


# ----------------------------------------------------------------------------- saving and checking


def save_base(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model.generation_config = generation_config(tokenizer)
    model.cpu().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


def save_adapter(model: PeftModel, name: str, out: Path) -> None:
    adapter_dir = out / "adapters" / name
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.cpu().save_pretrained(adapter_dir)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = DEMO_MODEL_NAME
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def greedy_accuracy(
    model: torch.nn.Module, bank: PromptBank, task: str | None, texts: Sequence[str], variant: Variant
) -> float:
    """Greedy ``generate`` exact match on ``texts``, left-padded in one batch."""
    tokenizer = bank.tokenizer
    tokenizer.padding_side = "left"
    prompts = [bank.prompt_text(t, variant) for t in texts]
    enc = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    model.eval()
    out = model.generate(**enc.to(device), max_new_tokens=96, do_sample=False)
    decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    want = [expected_output(task, t, enable_thinking=variant.thinking) for t in texts]
    return sum(d == w for d, w in zip(decoded, want, strict=True)) / len(texts)


def report(model: torch.nn.Module, bank: PromptBank, task: str | None, n: int) -> dict[str, float]:
    texts = sample_inputs(n, seed=7)
    name = task or "base"
    results = {}
    for variant in (Variant(False, True), Variant(True, True), Variant(False, False)):
        key = f"{name}{'+tools' if variant.tools else ''}{'' if variant.thinking else '+nothink'}"
        results[key] = greedy_accuracy(model, bank, task, texts, variant)
        print(f"  greedy exact match {key}: {results[key]:.4f}", flush=True)
    return results


def check_prompt_bank(bank: PromptBank) -> None:
    """The placeholder rendering must equal the tokenizer's own chat template path."""
    for variant in bank.frames:
        text = "Hello World 42"
        messages = [{"role": "user", "content": text}]
        direct = bank.tokenizer.apply_chat_template(messages, tokenize=False, **chat_kwargs(variant))
        assert direct == bank.prompt_text(text, variant), (direct, variant)


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.998, help="forced exact match that ends a stage")
    parser.add_argument(
        "--max-steps-scale", type=float, default=1.0, help="multiplies every stage's max_steps"
    )
    parser.add_argument("--eval-size", type=int, default=512, help="held-out inputs of the forced check")
    parser.add_argument("--report-size", type=int, default=200, help="held-out inputs per greedy check")
    parser.add_argument(
        "--only", nargs="*", help="stages to train (base, reverse, ...); others load from --out"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument(
        "--stage-seconds", type=float, default=float("inf"), help="time before a stage anneals"
    )
    parser.add_argument("--rank", nargs="*", default=[], metavar="TASK=R", help="override an adapter's rank")
    return parser.parse_args()


def adjusted(stage: Stage, args: argparse.Namespace) -> Stage:
    """The stage with --max-steps-scale and any --rank TASK=R applied (alpha keeps its ratio to r)."""
    lora = dict(stage.lora)
    for item in args.rank:
        task, rank = item.split("=")
        if task == stage.name:
            lora["lora_alpha"] = lora["lora_alpha"] * int(rank) // lora["r"]
            lora["r"] = int(rank)
    max_steps = max(1, int(stage.max_steps * args.max_steps_scale))
    return Stage(stage.task, stage.lr, max_steps, stage.tools_prob, stage.no_think_prob, lora)


def run_base(
    tokenizer: PreTrainedTokenizerFast, bank: PromptBank, args: argparse.Namespace, train: TrainArgs
) -> Qwen3ForCausalLM:
    stage = adjusted(STAGES[0], args)
    if args.only is not None and "base" not in args.only:
        return Qwen3ForCausalLM.from_pretrained(args.out / "model", dtype=torch.float32).to(train.device)
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(build_config(tokenizer)).to(train.device)
    print(f"base: {sum(p.numel() for p in model.parameters())} parameters", flush=True)
    train_stage(model, stage, bank, train, args.seed)
    save_base(model, tokenizer, args.out)
    return model.to(train.device)


def run_adapter(
    base: Qwen3ForCausalLM, stage: Stage, bank: PromptBank, args: argparse.Namespace, train: TrainArgs
) -> PeftModel:
    torch.manual_seed(args.seed + zlib.crc32(stage.name.encode()))
    base = copy.deepcopy(base)
    base.config.name_or_path = DEMO_MODEL_NAME
    model = get_peft_model(
        base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **stage.lora)
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{stage.name}: {trainable} trainable LoRA parameters", flush=True)
    train_stage(model, stage, bank, train, args.seed)
    save_adapter(model, stage.name, args.out)
    return model.to(train.device)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train = TrainArgs(
        device,
        args.batch_size,
        args.eval_every,
        args.target,
        eval_size=args.eval_size,
        workers=args.workers,
        stage_seconds=args.stage_seconds,
    )
    tokenizer = build_tokenizer()
    bank = PromptBank(tokenizer)
    check_prompt_bank(bank)
    start = time.time()
    base = run_base(tokenizer, bank, args, train)
    results = {}
    if args.only is None or "base" in args.only:
        results.update(report(base, bank, None, args.report_size))
    for stage in STAGES[1:]:
        if args.only is not None and stage.name not in args.only:
            continue
        model = run_adapter(base, adjusted(stage, args), bank, args, train)
        results.update(report(model, bank, stage.task, args.report_size))
    print(f"total {time.time() - start:.0f}s on {device}")
    for key, acc in results.items():
        print(f"ACCURACY {key:<24} {acc:.4f}")


if __name__ == "__main__":
    main()
