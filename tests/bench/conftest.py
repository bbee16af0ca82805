"""A real ``loraplex serve`` (the built-in demo model, CPU) and a real gateway in front of it, for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.serve_stack import Stack, start_gateway, start_serve
from tests.bench.helpers import DEMO_FLAGS


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs: Path = tmp_path_factory.mktemp("bench-stack")
    served = start_serve(DEMO_FLAGS, logs)
    try:
        start_gateway(served, logs)
        yield served
    finally:
        served.stop()
