"""The gateway's configuration: one dataclass, validated when built; the CLI fills it."""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and its value."""


REASONING_PARSERS = ("none", "think", "think-open")
TOOL_PARSERS = ("none", "hermes")


@dataclass
class GatewayConfig:
    backend: str = "127.0.0.1:50051"  # HOST:PORT of the loraplex gRPC server (the first, with several)
    backends: list[str] = field(default_factory=list)  # several static HOST:PORTs; empty = [backend]
    backend_dns: str | None = None  # NAME:PORT: every A/AAAA record of NAME is a backend (headless Service)
    backend_refresh_seconds: float = 10.0  # how often backend_dns is re-resolved
    backend_health_seconds: float = 2.0  # how often every backend's health is polled
    affinity_max_imbalance: int = 32  # calls above the least-loaded backend before affinity gives way
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # callers must send "Authorization: Bearer <api_key>"
    backend_token: str | None = None  # bearer token the gateway sends to the backend
    backend_ca: bytes | None = None  # PEM root certificates: TLS to the backend
    backend_cert: bytes | None = None  # PEM client certificate chain (mutual TLS)
    backend_key: bytes | None = None  # PEM client private key (mutual TLS)
    cors_origins: list[str] = field(default_factory=list)  # empty = CORS off
    max_request_bytes: int = 4 * 2**20
    reasoning_parser: str = "think"  # none | think | think-open (the template opened <think>)
    tool_parser: str = "hermes"  # none | hermes
    served_model_name: str | None = None  # the base model's id; none = the backend's model name
    request_timeout: float | None = None  # seconds; the gRPC deadline of each Generate call
    model_info_ttl: float = 10.0  # seconds the backend's model name and limits are cached

    def __post_init__(self) -> None:
        if not self.backend or ":" not in self.backend:
            raise ConfigError(f"backend={self.backend!r}: must be HOST:PORT")
        for address in self.backends:
            if ":" not in address:
                raise ConfigError(f"backend={address!r}: must be HOST:PORT")
        if self.backend_dns is not None:
            name, _, port = self.backend_dns.rpartition(":")
            if not name or not port.isdigit():
                raise ConfigError(f"backend_dns={self.backend_dns!r}: must be NAME:PORT")
        if self.backend_refresh_seconds <= 0:
            raise ConfigError(f"backend_refresh_seconds={self.backend_refresh_seconds}: must be > 0")
        if self.backend_health_seconds <= 0:
            raise ConfigError(f"backend_health_seconds={self.backend_health_seconds}: must be > 0")
        if self.affinity_max_imbalance < 0:
            raise ConfigError(f"affinity_max_imbalance={self.affinity_max_imbalance}: must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port}: must be in [0, 65535]")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"max_request_bytes={self.max_request_bytes}: must be >= 1024")
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ConfigError(f"reasoning_parser={self.reasoning_parser!r}: must be one of {list(REASONING_PARSERS)}")
        if self.tool_parser not in TOOL_PARSERS:
            raise ConfigError(f"tool_parser={self.tool_parser!r}: must be one of {list(TOOL_PARSERS)}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ConfigError(f"request_timeout={self.request_timeout}: must be > 0")
        if (self.backend_cert is None) != (self.backend_key is None):
            raise ConfigError("backend_cert and backend_key: give both (mutual TLS) or neither")
        if self.api_key == "":
            self.api_key = None

    def static_backends(self) -> list[str]:
        """The fixed backend addresses: ``backends``, else ``backend`` unless DNS names them all."""
        if self.backends:
            return list(self.backends)
        return [] if self.backend_dns else [self.backend]
