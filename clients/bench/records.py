"""What one request measured, from the client's side (times in seconds, perf_counter based)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    index: int
    adapter: str  # "" = the base model
    prompt_len: int  # the server's count when it gave one
    output_len: int = 0  # generated tokens (the server's usage count)
    start: float = 0.0  # when it was sent, from the start of the run
    ttft: float = 0.0  # send → first streamed message carrying tokens
    latency: float = 0.0  # send → the last message (end-to-end latency)
    itl: list[float] = field(default_factory=list)  # gaps between successive token-carrying messages
    success: bool = False
    error_code: str = ""  # gRPC status name, HTTP status, "ABORTED", or the exception's class
    error: str = ""

    def fail(self, code: str, message: str) -> None:
        self.success = False
        self.error_code = code
        self.error = message[:500]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
