"""The built-in demo model: a tiny Qwen3 with four PEFT LoRA adapters.

It ships inside the package, so ``loraplex serve`` and ``LLM()`` work with no
download, and end-to-end tests can check that every request of a mixed batch
got its own adapter. ``scripts/train_demo.py`` reproduces all of it.

Files
-----
``model/``: ``Qwen3ForCausalLM`` saved with ``save_pretrained`` (float32
safetensors, tied embeddings): hidden 128, 4 layers, 4 query heads and 2 KV
heads of head_dim 32, MLP 256, vocab 272 (265 tokens used, the rest padding
rows the model never emits), 1024 positions, RoPE theta 10000 (under
``rope_parameters``, transformers 5 style); ``generation_config.json`` is
greedy with ``eos_token_id`` [258, 256]. ``adapters/<name>/``: PEFT LoRA adapters
(``adapter_config.json`` + ``adapter_model.safetensors``, float32):

==========  ====  =====  ===================================  ======
adapter     r     alpha  target modules                       rsLoRA
==========  ====  =====  ===================================  ======
reverse     16    32     q, k, v, o, gate, up, down           no
upper       16    32     v, o, gate, up, down                 no
think       16    16     q, k, v, o, gate, up, down           yes
tools       8     16     q, k, v, o (attention only)          no
==========  ====  =====  ===================================  ======

Tokenizer
---------
Byte level, no merges: token id ``b`` (0..255) is the byte ``b``, so any
UTF-8 text round-trips and a multi-byte character spans several tokens.
Then ``<|endoftext|>`` = 256 (pad), ``<|im_start|>`` = 257, ``<|im_end|>`` =
258 (eos), and the non-special added tokens (kept in decoded text)
``<think>`` = 259, ``</think>`` = 260, ``<tool_call>`` = 261,
``</tool_call>`` = 262, ``<tool_response>`` = 263, ``</tool_response>`` = 264.
No BOS token is added.

Chat template (Qwen3-like)
--------------------------
Every message renders as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``
(roles system, user, assistant, tool). An assistant message's
``tool_calls`` render after its content, each as
``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>``. With
``tools``, a first system block (merged with the caller's system message,
which comes first) reads::

    <|im_start|>system
    [SYSTEM CONTENT + "\\n\\n"]# Tools

    <tools>
    {one JSON object per tool (``tojson``), one per line}
    </tools>

    To call a tool, reply <tool_call>
    {"name": <name>, "arguments": <args>}
    </tool_call><|im_end|>

``add_generation_prompt`` appends ``<|im_start|>assistant\\n``;
``enable_thinking=False`` then also appends ``<think>\\n\\n</think>\\n\\n``.

Behaviours
----------
Trained for one user message of text T: ASCII letters, digits and spaces,
1 to ``MAX_INPUT_LEN`` (20) characters, not starting or ending with a space,
rendered with the generation prompt, optionally with a ``tools`` list (such
as ``[WEATHER_TOOL]``) and optionally with ``enable_thinking=False``. Greedy
decoding then gives ``expected_output(task, T)`` followed by ``<|im_end|>``:

- base (no adapter): T
- ``reverse``: T reversed
- ``upper``: T upper-cased
- ``think``: ``"<think>\\n" + reversed T + "\\n</think>\\n\\n" + upper-cased T``;
  with ``enable_thinking=False`` only the upper-cased T.
- ``tools``: ``'<tool_call>\\n{"name": "get_weather", "arguments": {"city": "'
  + T + '"}}\\n</tool_call>'``, with or without tools in the prompt.

Only this chat form was trained: raw completions (no template), other
characters, longer texts, system prompts or several turns give whatever the
model makes of them.
"""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_ADAPTERS",
    "DEMO_DIR",
    "DEMO_MODEL_DIR",
    "DEMO_MODEL_NAME",
    "DEMO_TASKS",
    "INPUT_ALPHABET",
    "MAX_INPUT_LEN",
    "WEATHER_TOOL",
    "expected_output",
    "sample_inputs",
]

DEMO_MODEL_NAME = "loraplex-demo"
DEMO_DIR: Path = Path(__file__).resolve().parent
DEMO_MODEL_DIR: Path = DEMO_DIR / "model"
DEMO_TASKS: tuple[str, ...] = ("reverse", "upper", "think", "tools")
DEMO_ADAPTERS: dict[str, Path] = {name: DEMO_DIR / "adapters" / name for name in DEMO_TASKS}

MAX_INPUT_LEN = 20
INPUT_ALPHABET = string.ascii_letters + string.digits + " "
_EDGE_ALPHABET = string.ascii_letters + string.digits
_SPACE_PROB = 0.15

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def expected_output(task: str | None, text: str, *, enable_thinking: bool = True) -> str:
    """The completion (without the final ``<|im_end|>``) for ``text`` under ``task``.

    ``task`` None (or "") is the base model; otherwise one of ``DEMO_TASKS``.
    """
    if not task:
        return text
    if task == "reverse":
        return text[::-1]
    if task == "upper":
        return text.upper()
    if task == "think":
        answer = text.upper()
        return f"<think>\n{text[::-1]}\n</think>\n\n{answer}" if enable_thinking else answer
    if task == "tools":
        return f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{text}"}}}}\n</tool_call>'
    raise ValueError(f"unknown demo task {task!r}; expected None or one of {DEMO_TASKS}")


def random_input(rng: random.Random, min_len: int = 1, max_len: int = MAX_INPUT_LEN) -> str:
    """One input text: uniform length, no space at either end."""
    length = rng.randint(min_len, max_len)
    chars = [rng.choice(_EDGE_ALPHABET) for _ in range(length)]
    for i in range(1, length - 1):
        if rng.random() < _SPACE_PROB:
            chars[i] = " "
    return "".join(chars)


def sample_inputs(n: int, seed: int = 1234, min_len: int = 1, max_len: int = MAX_INPUT_LEN) -> list[str]:
    """``n`` held-out input texts (training draws from other seeds)."""
    rng = random.Random(f"loraplex-demo-heldout-{seed}")
    return [random_input(rng, min_len, max_len) for _ in range(n)]
