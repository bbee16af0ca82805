"""The real serve + gateway processes for the OpenAI / LangChain tests (built by tests/gateway's helpers)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "gateway"))

from e2e_stack import Stack, start_stack  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("structured-e2e"))
    yield s
    s.stop()
