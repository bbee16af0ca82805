"""The shipped demo model and adapters, checked with HF transformers + PEFT on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from loraplex.backend.demo import (  # noqa: E402
    DEMO_ADAPTERS,
    DEMO_DIR,
    DEMO_MODEL_DIR,
    DEMO_MODEL_NAME,
    DEMO_TASKS,
    MAX_INPUT_LEN,
    WEATHER_TOOL,
    expected_output,
    sample_inputs,
)

N_HELDOUT = 100
MIN_ACCURACY = 0.99


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def load_model(task: str | None) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    if task is not None:
        model = peft.PeftModel.from_pretrained(model, DEMO_ADAPTERS[task])
    return model.eval()


def chat(tokenizer: Any, text: str, **kwargs: Any) -> str:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 96) -> list[str]:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# ----------------------------------------------------------------------------- files


def test_files_config_and_size() -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (DEMO_MODEL_DIR / name).is_file(), name
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    generation = json.loads((DEMO_MODEL_DIR / "generation_config.json").read_text())
    assert 258 in generation["eos_token_id"]
    assert set(DEMO_ADAPTERS) == set(DEMO_TASKS)
    ranks = set()
    for path in DEMO_ADAPTERS.values():
        adapter_config = json.loads((path / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == "LORA"
        assert adapter_config["base_model_name_or_path"] == DEMO_MODEL_NAME
        assert (path / "adapter_model.safetensors").is_file()
        ranks.add(adapter_config["r"])
    assert len(ranks) > 1
    total = sum(p.stat().st_size for p in Path(DEMO_DIR).rglob("*") if p.is_file() and p.suffix != ".py")
    assert total < 4.5 * 2**20


# ----------------------------------------------------------------------------- tokenizer and template


def test_tokenizer_round_trips_non_ascii(tokenizer: Any) -> None:
    text = "héllo wörld — 日本語 🙂 naïve"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    # A multi-byte character split over tokens decodes to replacement chars until complete.
    assert tokenizer.decode(ids[:2]) != text[:2]
    assert (
        len(tokenizer) <= 272
        and tokenizer.eos_token == "<|im_end|>"
        and tokenizer.pad_token == "<|endoftext|>"
    )


def test_special_and_added_tokens(tokenizer: Any) -> None:
    expected = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258, "<think>": 259}
    expected |= {"</think>": 260, "<tool_call>": 261, "</tool_call>": 262}
    for token, token_id in expected.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    ids = tokenizer.encode("<think>\nab\n</think><|im_end|>", add_special_tokens=False)
    assert ids == [259, 10, 97, 98, 10, 260, 258]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nab\n</think>"


def test_chat_template_basic(tokenizer: Any) -> None:
    assert chat(tokenizer, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    no_think = chat(tokenizer, "hi", enable_thinking=False)
    assert no_think == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 257 and ids[-1] == 10


def test_chat_template_tools_and_roles(tokenizer: Any) -> None:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Oslo"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False)
    tool_json = json.dumps(WEATHER_TOOL, ensure_ascii=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\n<tools>\n"
        + tool_json
        + '\n</tools>\n\nTo call a tool, reply <tool_call>\n{"name": <name>, "arguments": <args>}\n'
        + "</tool_call><|im_end|>\n"
        + "<|im_start|>user\nOslo<|im_end|>\n"
        + '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        + "<|im_start|>tool\nsunny<|im_end|>\n"
    )


def test_expected_output_formats() -> None:
    assert expected_output(None, "ab c1") == "ab c1"
    assert expected_output("reverse", "ab c1") == "1c ba"
    assert expected_output("upper", "ab c1") == "AB C1"
    assert expected_output("think", "ab c1") == "<think>\n1c ba\n</think>\n\nAB C1"
    assert expected_output("think", "ab c1", enable_thinking=False) == "AB C1"
    tools = expected_output("tools", "ab c1")
    assert tools == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "ab c1"}}\n</tool_call>'
    with pytest.raises(ValueError, match="unknown demo task"):
        expected_output("nope", "x")
    inputs = sample_inputs(50, seed=3)
    assert inputs == sample_inputs(50, seed=3) != sample_inputs(50, seed=4)
    assert all(1 <= len(t) <= MAX_INPUT_LEN and t == t.strip() for t in inputs)


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.slow  # HF generate on 125 prompts per task: minutes on a CPU
@pytest.mark.parametrize("task", [None, *DEMO_TASKS])
def test_greedy_accuracy(tokenizer: Any, task: str | None) -> None:
    texts = sample_inputs(N_HELDOUT, seed=2024)
    model = load_model(task)
    plain = greedy(model, tokenizer, [chat(tokenizer, t) for t in texts])
    with_tools = greedy(model, tokenizer, [chat(tokenizer, t, tools=[WEATHER_TOOL]) for t in texts[:25]])
    hits = [out == expected_output(task, t) for out, t in zip(plain, texts, strict=True)]
    misses = [(t, out) for out, t, ok in zip(plain, texts, hits, strict=True) if not ok]
    assert sum(hits) / len(texts) >= MIN_ACCURACY, misses[:5]
    tools_hits = [out == expected_output(task, t) for out, t in zip(with_tools, texts[:25], strict=True)]
    assert sum(tools_hits) >= 24


def test_think_without_thinking_answers_directly(tokenizer: Any) -> None:
    texts = sample_inputs(25, seed=99)
    outputs = greedy(
        load_model("think"), tokenizer, [chat(tokenizer, t, enable_thinking=False) for t in texts]
    )
    hits = [
        out == expected_output("think", t, enable_thinking=False)
        for out, t in zip(outputs, texts, strict=True)
    ]
    assert sum(hits) >= 24
