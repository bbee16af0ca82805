"""The gRPC front end's configuration: one more section of the typed config tree.

Fields carry help and bounds in ``metadata`` like ``loraplex.config``;
the CLI builds its ``serve`` flags from them. Secrets are never read from the
environment here: the CLI resolves ``--api-key-file`` / ``LORAPLEX_API_KEY``.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.config import _Validated, opt
from loraplex.errors import ConfigError


@dataclass
class ServerConfig(_Validated):
    host: str = opt("127.0.0.1", "address the gRPC server listens on (0.0.0.0 = every interface; the Helm chart passes the pod address)")
    port: int = opt(50051, "gRPC port; 0 = any free port", lo=0, hi=65535)
    metrics_port: int | None = opt(9400, "Prometheus /metrics port; 0 = any free port", lo=0, hi=65535)
    metrics_host: str = opt("127.0.0.1", "address the metrics endpoint listens on (0.0.0.0 = every interface)")
    api_key: str | None = opt(None, "bearer token every RPC must carry (authorization: Bearer <token>); "
                                    "none = auth off")
    auth_health_checks: bool = opt(False, "require the token on grpc.health.v1 too (off by default so "
                                          "Kubernetes probes work without it)")
    tls_cert_file: str | None = opt(None, "PEM server certificate chain; with --tls-key-file turns TLS on")
    tls_key_file: str | None = opt(None, "PEM private key of the server certificate")
    tls_client_ca_file: str | None = opt(None, "PEM CA bundle; when set, clients must present a certificate "
                                               "it signed (mutual TLS)")
    grace_period: float = opt(30.0, "seconds in-flight requests get to finish after SIGTERM", lo=0.0)
    max_message_bytes: int = opt(4 * 2**20, "largest request or response message, in bytes", lo=1024)
    max_concurrent_rpcs: int | None = opt(None, "most RPCs handled at once; none = unbounded", lo=1)
    health_poll_seconds: float = opt(0.5, "how often health asks the engine whether its loop is alive",
                                     lo=0.01, hi=60.0)
    reflection: bool = opt(True, "serve gRPC server reflection")
    vllm_metrics: bool = opt(True, "also export vLLM-named metrics (vllm:*) on /metrics, for the Gateway API "
                                   "Inference Extension, llm-d and AIBrix")
    engine_process: bool = opt(True, "run the engine core in a process of its own (false: on a thread of the "
                                     "server process)")

    def check(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError(f"tls_cert_file={self.tls_cert_file!r}, tls_key_file={self.tls_key_file!r}: "
                              "give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError(f"tls_client_ca_file={self.tls_client_ca_file!r}: mutual TLS needs "
                              "tls_cert_file and tls_key_file")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key='': must not be empty (leave it unset to turn auth off)")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None
