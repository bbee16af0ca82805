"""The gateway's configuration: one typed dataclass of ``loraplex.config`` fields (help text and
bounds), validated when built; the CLI's flags are generated from the same fields."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.config import _Validated, opt
from loraplex.errors import ConfigError

DEFAULT_BACKEND = "127.0.0.1:50051"
REASONING_PARSERS = ("none", "think", "think-open")
TOOL_PARSERS = ("none", "hermes")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class TlsMaterial:
    """PEM bytes read from the configured files; all None = plaintext to the backend."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None


@dataclass
class GatewayConfig(_Validated):
    backend: list[str] = opt(list, f"a loraplex gRPC server as HOST:PORT; several = replicas with adapter "
                                   f"affinity (default {DEFAULT_BACKEND} unless --backend-dns)", factory=True)
    backend_dns: str | None = opt(None, "NAME:PORT: every A/AAAA record of NAME is a backend, re-resolved "
                                        "periodically (a Kubernetes headless Service)")
    backend_refresh_seconds: float = opt(10.0, "how often --backend-dns is re-resolved", lo=0.01)
    backend_health_seconds: float = opt(2.0, "how often each backend's health is polled", lo=0.01)
    backend_reconnect_seconds: float = opt(1.0, "longest wait between reconnection attempts to a backend "
                                                "that went away (capped exponential backoff)", lo=0.05, hi=60)
    affinity_max_imbalance: int = opt(32, "calls an adapter's rendezvous backend may carry above the "
                                          "least-loaded one before its requests go to the least loaded", lo=0)
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "port to listen on", lo=0, hi=65535)
    api_key: str | None = opt(None, "callers must send 'Authorization: Bearer KEY' (else $LORAPLEX_API_KEY; "
                                    "unset = open)")
    backend_token: str | None = opt(None, "bearer token sent to the backend (else $LORAPLEX_BACKEND_TOKEN)")
    backend_ca: str | None = opt(None, "PEM root certificates file: use TLS to the backend")
    backend_cert: str | None = opt(None, "PEM client certificate chain file (mutual TLS)")
    backend_key: str | None = opt(None, "PEM client private key file (mutual TLS)")
    cors_origins: list[str] = opt(list, "origins allowed by CORS (comma-separated or repeated); none = CORS off",
                                  factory=True)
    max_request_bytes: int = opt(4 * 2**20, "largest request body in bytes", lo=1024)
    max_choices: int = opt(256, "most choices one request may ask for (prompts x n); more is a 400", lo=1,
                           hi=65536)
    reasoning_parser: str = opt("think", "split <think>...</think> into reasoning_content: 'think' when the "
                                         "model writes <think>, 'think-open' when the chat template opens it",
                                choices=REASONING_PARSERS)
    tool_parser: str = opt("hermes", "parse tool calls from the output when the request has tools",
                           choices=TOOL_PARSERS)
    served_model_name: str | None = opt(None, "the base model's id in the API; none = the backend's model name")
    request_timeout: float | None = opt(None, "seconds each generation may take (gRPC deadline)", lo=0.001)
    model_info_ttl: float = opt(10.0, "seconds the backend's model name and limits are cached", lo=0)
    log_level: str = opt("info", "server log level", choices=LOG_LEVELS)

    def check(self) -> None:
        for address in self.backend:
            if not _is_host_port(address):
                raise ConfigError(f"backend={address!r}: must be HOST:PORT")
        if self.backend_dns is not None and not _is_host_port(self.backend_dns):
            raise ConfigError(f"backend_dns={self.backend_dns!r}: must be NAME:PORT")
        if (self.backend_cert is None) != (self.backend_key is None):
            raise ConfigError("backend_cert and backend_key: give both (mutual TLS) or neither")
        self.cors_origins = [o.strip() for entry in self.cors_origins for o in entry.split(",") if o.strip()]
        self.api_key = self.api_key or None
        self.backend_token = self.backend_token or None

    def static_backends(self) -> list[str]:
        """The fixed backend addresses: ``backend``, else the default unless DNS names them all."""
        if self.backend:
            return list(dict.fromkeys(self.backend))
        return [] if self.backend_dns else [DEFAULT_BACKEND]

    def tls(self) -> TlsMaterial:
        """The certificate files' bytes; ConfigError naming the file when one cannot be read."""
        return TlsMaterial(root_certificates=_read("backend_ca", self.backend_ca),
                           certificate_chain=_read("backend_cert", self.backend_cert),
                           private_key=_read("backend_key", self.backend_key))


def _is_host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit()


def _read(name: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}={path!r}: {exc.strerror or exc}") from None
