"""The README section's examples, run as written against real ``serve`` + ``gateway`` processes
(only ``localhost:8000`` is replaced by the test gateway's address)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_stack import Stack

from loraplex.backend.demo import DEMO_MODEL_DIR
from loraplex.gateway import cli

README = Path(__file__).resolve().parents[2] / "gateway" / "README_SECTION.md"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(README.read_text()) if kind == lang]


def localize(code: str, stack: Stack) -> str:
    return code.replace("http://localhost:8000", stack.url).replace("localhost:8000", stack.url)


def test_start_commands_parse() -> None:
    """The ``sh`` block's commands are valid for the CLI as written."""
    for line in blocks("sh")[0].splitlines():
        argv = shlex.split(line.split("#")[0])
        assert argv[0] == "loraplex"
        if argv[1] == "gateway":
            parser = argparse.ArgumentParser()
            cli.add_arguments(parser)
            assert cli.config_from_args(parser.parse_args(argv[2:])).backend == ["localhost:50051"]
    result = subprocess.run([sys.executable, "-m", "loraplex.backend.cli", "gateway", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--backend" in result.stdout


needs_demo = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(),
                                reason="the demo model's weights are not built")


def run_bash(code: str, stack: Stack) -> str:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", localize(code, stack)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_demo
def test_curl_examples(stack: Stack) -> None:
    models, chat, stream, adapters = (run_bash(b, stack) for b in blocks("bash"))
    assert '"id":"loraplex-demo"' in models and '"id":"reverse"' in models
    assert '"content":"dlrow olleH"' in chat
    events = [line[len("data: "):] for line in stream.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0]["role"] == "assistant" and "".join(d.get("content", "") for d in deltas) == "HELLO WORLD"
    lines = adapters.splitlines()
    assert lines[0] == "Success: LoRA adapter 'shout' added successfully."
    assert '"content":"QUIET PLEASE"' in lines[1]
    assert lines[2] == "Success: LoRA adapter 'shout' removed successfully."


@needs_demo
def test_python_example_prints_what_the_readme_says(stack: Stack) -> None:
    code, = blocks("python")
    expected, = blocks("text")
    result = subprocess.run([sys.executable, "-c", localize(code, stack)], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
