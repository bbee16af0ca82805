from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from e2e_stack import Stack, start_stack  # noqa: E402
from gateway_harness import GatewayHarness  # noqa: E402

from loraplex.gateway.config import GatewayConfig  # noqa: E402


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayHarness]:
    """The gateway with default settings in front of the fake backend."""
    harness = GatewayHarness()
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def gw_secure() -> Iterator[GatewayHarness]:
    """API key "sekret", CORS for https://app.example, 4 KiB bodies."""
    harness = GatewayHarness(GatewayConfig(api_key="sekret", cors_origins=["https://app.example"],
                                           max_request_bytes=4096))
    yield harness
    harness.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Real ``loraplex serve`` (demo model) + two ``loraplex gateway`` processes (one with an API key)."""
    s = start_stack(tmp_path_factory.mktemp("e2e"))
    yield s
    s.stop()
