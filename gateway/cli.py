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
from pathlib import Path

from loraplex.gateway.config import REASONING_PARSERS, TOOL_PARSERS, ConfigError, GatewayConfig

API_KEY_ENV = "LORAPLEX_API_KEY"
BACKEND_TOKEN_ENV = "LORAPLEX_BACKEND_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = GatewayConfig()
    parser.add_argument("--backend", action="append", default=None, metavar="HOST:PORT",
                        help=f"a loraplex gRPC server; repeat for several replicas (default {d.backend})")
    parser.add_argument("--backend-dns", default=None, metavar="NAME:PORT",
                        help="every A/AAAA record of NAME is a backend on PORT, re-resolved periodically "
                             "(a Kubernetes headless Service)")
    parser.add_argument("--backend-refresh-seconds", type=float, default=d.backend_refresh_seconds,
                        help=f"how often --backend-dns is re-resolved (default {d.backend_refresh_seconds})")
    parser.add_argument("--backend-health-seconds", type=float, default=d.backend_health_seconds,
                        help=f"how often each backend's health is polled (default {d.backend_health_seconds})")
    parser.add_argument("--affinity-max-imbalance", type=int, default=d.affinity_max_imbalance,
                        help="calls an adapter's rendezvous backend may carry above the least-loaded one before "
                             f"its requests go to the least loaded (default {d.affinity_max_imbalance})")
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"port to listen on (default {d.port})")
    parser.add_argument("--api-key", default=None,
                        help=f"callers must send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; unset = open)")
    parser.add_argument("--backend-token", default=None,
                        help=f"bearer token sent to the backend (default: ${BACKEND_TOKEN_ENV})")
    parser.add_argument("--backend-ca", type=Path, default=None, help="PEM root certificates: use TLS to the backend")
    parser.add_argument("--backend-cert", type=Path, default=None, help="PEM client certificate chain (mutual TLS)")
    parser.add_argument("--backend-key", type=Path, default=None, help="PEM client private key (mutual TLS)")
    parser.add_argument("--cors-origins", default="", metavar="ORIGINS",
                        help="comma-separated origins allowed by CORS (default: none, CORS off)")
    parser.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                        help=f"largest request body (default {d.max_request_bytes})")
    parser.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=d.reasoning_parser,
                        help="split <think>…</think> into reasoning_content: 'think' when the model writes "
                             "<think>, 'think-open' when the chat template opens it in the prompt, 'none' off "
                             f"(default {d.reasoning_parser})")
    parser.add_argument("--tool-parser", choices=TOOL_PARSERS, default=d.tool_parser,
                        help=f"parse tool calls from the output when the request has tools (default {d.tool_parser})")
    parser.add_argument("--served-model-name", default=None,
                        help="the base model's id in the API (default: the backend's model name)")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="seconds each generation may take (gRPC deadline; default none)")
    parser.add_argument("--log-level", default="info", type=str.lower,
                        choices=("critical", "error", "warning", "info", "debug"))


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The config; the API key and backend token fall back to the environment, read now."""
    backends: list[str] = args.backend or []
    return GatewayConfig(
        backend=backends[0] if backends else GatewayConfig.backend,
        backends=backends if len(backends) > 1 or args.backend_dns else [],
        backend_dns=args.backend_dns, backend_refresh_seconds=args.backend_refresh_seconds,
        backend_health_seconds=args.backend_health_seconds, affinity_max_imbalance=args.affinity_max_imbalance,
        host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        backend_token=args.backend_token or os.environ.get(BACKEND_TOKEN_ENV) or None,
        backend_ca=_read(args.backend_ca), backend_cert=_read(args.backend_cert), backend_key=_read(args.backend_key),
        cors_origins=[o.strip() for o in args.cors_origins.split(",") if o.strip()],
        max_request_bytes=args.max_request_bytes, reasoning_parser=args.reasoning_parser,
        tool_parser=args.tool_parser, served_model_name=args.served_model_name,
        request_timeout=args.request_timeout,
    )


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def run(args: argparse.Namespace) -> int:
    """Serves until SIGINT/SIGTERM; 0 on a clean stop, 2 on a bad configuration."""
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"loraplex gateway: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from loraplex.gateway.app import create_app
    from loraplex.gateway.tracing import setup_tracing

    setup_tracing()
    with _sigterm_is_a_clean_stop():
        uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=args.log_level,
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
