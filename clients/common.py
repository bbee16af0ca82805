"""What the sync and asyncio clients share: channel credentials, call metadata, results.

Imports only grpc and the generated stubs (no torch, no loraplex.backend).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from loraplex.clients.v1 import inference_pb2 as pb

Metadata = Sequence[tuple[str, str]]
HEALTH_SERVICE = "loraplex.v1.InferenceService"


@dataclass
class GenerateResult:
    """A whole Generate stream folded into one answer."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    stop_string: str = ""
    stop_token_id: int | None = None
    usage: pb.Usage = field(default_factory=pb.Usage)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    timings: pb.Timings = field(default_factory=pb.Timings)
    adapter_version: int = 0

    def add(self, chunk: pb.GenerateResponse) -> None:
        """Folds one stream message into the result."""
        self.request_id = chunk.request_id or self.request_id
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.prompt_logprobs.extend(chunk.prompt_logprobs)
        self.adapter_version = chunk.adapter_version or self.adapter_version
        if chunk.finished:
            self.finish_reason = chunk.finish_reason
            self.stop_string = chunk.stop_string
            self.stop_token_id = chunk.stop_token_id if chunk.HasField("stop_token_id") else None
            self.usage.CopyFrom(chunk.usage)
            self.timings.CopyFrom(chunk.timings)


def fold(chunks: Iterable[pb.GenerateResponse]) -> GenerateResult:
    result = GenerateResult()
    for chunk in chunks:
        result.add(chunk)
    return result


def call_metadata(token: str | None, metadata: Metadata | None) -> list[tuple[str, str]] | None:
    """The caller's metadata plus the bearer token, when there is one."""
    merged = list(metadata or ())
    if token:
        merged.append(("authorization", f"Bearer {token}"))
    return merged or None


def channel_credentials(root_certificates: bytes | None, private_key: bytes | None,
                        certificate_chain: bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials when any certificate material is given (mutual TLS with key + chain), else None."""
    if root_certificates is None and private_key is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=private_key,
                                        certificate_chain=certificate_chain)


def load_request(name: str, source: str, revision: str, replace: bool, pin: bool) -> pb.LoadAdapterRequest:
    return pb.LoadAdapterRequest(name=name, source=source, revision=revision, replace=replace, pin=pin)


def tokenize_request(prompt: str | None, chat: pb.ChatInput | None,
                     add_special_tokens: bool | None) -> pb.TokenizeRequest:
    """A Tokenize request of text or a chat input (exactly one)."""
    if (prompt is None) == (chat is None):
        raise ValueError("give exactly one of prompt or chat")
    req = pb.TokenizeRequest(prompt=prompt) if prompt is not None else pb.TokenizeRequest(chat=chat)
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


def detokenize_request(token_ids: Iterable[int], skip_special_tokens: bool | None) -> pb.DetokenizeRequest:
    req = pb.DetokenizeRequest(token_ids=list(token_ids))
    if skip_special_tokens is not None:
        req.skip_special_tokens = skip_special_tokens
    return req
