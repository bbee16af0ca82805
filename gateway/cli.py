"""``loraplex gateway``: the OpenAI-compatible REST gateway in front of a loraplex gRPC server.

    loraplex gateway --backend localhost:50051 --port 8000
    loraplex gateway --backend a:50051 --backend b:50051        # several replicas, adapter affinity
    loraplex gateway --backend-dns loraplex-backend:50051      # every address of a headless Service

The main CLI calls ``add_arguments(parser)`` for the subcommand and ``run(args)``.
Secrets may come from the environment, read when the command runs:
``LORAPLEX_API_KEY`` (the key callers must send) and ``LORAPLEX_BACKEND_TOKEN``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from loraplex.cli_flags import add_fields, given_fields
from loraplex.errors import ConfigError
from loraplex.gateway.config import GatewayConfig

API_KEY_ENV = "LORAPLEX_API_KEY"
BACKEND_TOKEN_ENV = "LORAPLEX_BACKEND_TOKEN"
METAVARS = {"backend": "HOST:PORT", "backend_dns": "NAME:PORT", "cors_origins": "ORIGINS", "backend_ca": "PATH",
            "backend_cert": "PATH", "backend_key": "PATH", "api_key": "KEY", "backend_token": "TOKEN"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``GatewayConfig`` field, with its help, bounds and default."""
    add_fields(parser.add_argument_group("gateway options"), GatewayConfig, metavars=METAVARS)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The config of the flags given; the API key and backend token fall back to the environment, read now."""
    kwargs = given_fields(args, GatewayConfig)
    kwargs["api_key"] = kwargs.get("api_key") or os.environ.get(API_KEY_ENV) or None
    kwargs["backend_token"] = kwargs.get("backend_token") or os.environ.get(BACKEND_TOKEN_ENV) or None
    return GatewayConfig(**kwargs)


def run(args: argparse.Namespace) -> int:
    """Serves until SIGINT/SIGTERM; 0 on a clean stop, 2 on a bad configuration."""
    import uvicorn

    from loraplex.gateway.app import create_app
    from loraplex.gateway.tracing import setup_tracing

    try:
        config = config_from_args(args)
        app = create_app(config, tracer_provider=setup_tracing())
    except ConfigError as exc:
        print(f"loraplex gateway: {exc}", file=sys.stderr)
        return 2
    with _sigterm_is_a_clean_stop():
        uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                    timeout_graceful_shutdown=30)
    return 0


@contextlib.contextmanager
def _sigterm_is_a_clean_stop() -> Iterator[None]:
    """uvicorn drains on SIGTERM, then re-raises the signal to the previous handler; a no-op
    handler there makes the drained exit status 0 (SIGINT keeps its KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """``python -m loraplex.gateway.cli``: the same command without the main CLI."""
    parser = argparse.ArgumentParser(prog="loraplex gateway", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
