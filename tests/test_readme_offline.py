"""The README's offline example runs as pasted (in a fresh interpreter) and prints what its
comments say it prints."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def offline_example() -> str:
    section = README.read_text().split("### Offline (Python)", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block under 'Offline (Python)'"
    return match.group(1)


def promised_output(code: str) -> list[str]:
    """The ``# ...`` comment of each ``print(...)`` line, in order."""
    return [line.split("#", 1)[1].strip() for line in code.splitlines() if line.startswith("print(")]


def test_readme_offline_example_runs_as_pasted() -> None:
    code = offline_example()
    ast.parse(code)
    promised = promised_output(code)
    assert len(promised) >= 2, code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == promised
