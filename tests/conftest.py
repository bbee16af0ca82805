"""Test-session setup shared by every test folder, and the offline ``llm`` fixture."""

from __future__ import annotations

import os
from typing import Any

import pytest

# One intra-op thread for torch here and in every server process a test starts (they inherit
# the environment): on a 2-core machine shared with other work, torch's OpenMP threads wait on
# each other and the demo-accuracy test went from 10 s to over 5 minutes; the tiny test models
# gain nothing from a second thread. Set before torch is imported; an explicit value wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter. The flag must be set before
# any module decorates a kernel, i.e. before the first test module imports loraplex.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def llm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The test module's offline ``LLM``: the built-in demo model, or, when the module sets
    ``TINY_MODEL`` (an architecture of tests/engine_factory.py), a tiny random float32 one.
    The module's ``ENGINE_ARGS`` are passed on as engine arguments."""
    from loraplex import LLM

    engine_args: dict[str, Any] = getattr(request.module, "ENGINE_ARGS", {})
    arch: str | None = getattr(request.module, "TINY_MODEL", None)
    if arch is None:
        return LLM(**engine_args)
    from tests.engine_factory import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp(arch), arch)
    return LLM(str(path), dtype="float32", kv_cache_memory_bytes=2**26, **engine_args)
