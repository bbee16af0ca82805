"""One real demo-model server per test session (plus an in-memory span exporter on it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loraplex.backend.tracing import configure_tracing
from tests.server.harness import RunningServer, start_server, stop_server


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="session")
def demo(span_exporter: InMemorySpanExporter) -> Iterator[RunningServer]:
    """The built-in demo model and its adapters behind a real gRPC server."""
    rs = start_server(tracer_provider=configure_tracing(span_exporter))
    yield rs
    stop_server(rs)
