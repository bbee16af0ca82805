"""A synchronous client of ``loraplex.v1.InferenceService``.

    with Client("localhost:50051") as client:
        for chunk in client.generate_stream(pb.GenerateRequest(prompt="hi")):
            print(chunk.text, end="")

Errors surface unwrapped as ``grpc.RpcError`` (``.code()``, ``.details()``).
Leaving a ``generate_stream`` loop early (or closing the iterator) cancels the call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.clients.common import (
    HEALTH_SERVICE,
    GenerateResult,
    Metadata,
    call_metadata,
    channel_credentials,
    detokenize_request,
    fold,
    load_request,
    tokenize_request,
)
from loraplex.clients.v1 import inference_pb2 as pb
from loraplex.clients.v1 import inference_pb2_grpc as pb_grpc


class Client:
    """One channel to a loraplex server; ``token`` is sent as ``authorization: Bearer``."""

    def __init__(self, target: str, *, token: str | None = None, root_certificates: bytes | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None,
                 options: Sequence[tuple[str, Any]] | None = None) -> None:
        creds = channel_credentials(root_certificates, private_key, certificate_chain)
        opts = list(options or ())
        if creds is None:
            self.channel = grpc.insecure_channel(target, options=opts)
        else:
            self.channel = grpc.secure_channel(target, creds, options=opts)
        self.target = target
        self._token = token
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def generate_stream(self, request: pb.GenerateRequest, *, timeout: float | None = None,
                        metadata: Metadata | None = None) -> Iterator[pb.GenerateResponse]:
        """The Generate stream's messages; the last has ``finished`` set."""
        call = self.stub.Generate(request, timeout=timeout, metadata=call_metadata(self._token, metadata))
        try:
            yield from call
        finally:
            call.cancel()

    def generate(self, request: pb.GenerateRequest, *, timeout: float | None = None,
                 metadata: Metadata | None = None) -> GenerateResult:
        """The whole stream folded into one result."""
        return fold(self.generate_stream(request, timeout=timeout, metadata=metadata))

    def load_adapter(self, name: str, source: str, revision: str = "", replace: bool = False,
                     pin: bool = False, *, timeout: float | None = None,
                     metadata: Metadata | None = None) -> pb.AdapterInfo:
        response = self.stub.LoadAdapter(load_request(name, source, revision, replace, pin),
                                         timeout=timeout, metadata=call_metadata(self._token, metadata))
        return response.adapter

    def unload_adapter(self, name: str, *, timeout: float | None = None,
                       metadata: Metadata | None = None) -> None:
        self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=timeout,
                                metadata=call_metadata(self._token, metadata))

    def list_adapters(self, *, timeout: float | None = None,
                      metadata: Metadata | None = None) -> list[pb.AdapterInfo]:
        response = self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout,
                                          metadata=call_metadata(self._token, metadata))
        return list(response.adapters)

    def server_info(self, *, timeout: float | None = None,
                    metadata: Metadata | None = None) -> pb.GetServerInfoResponse:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout,
                                       metadata=call_metadata(self._token, metadata))

    def tokenize(self, prompt: str | None = None, *, chat: pb.ChatInput | None = None,
                 add_special_tokens: bool | None = None, timeout: float | None = None,
                 metadata: Metadata | None = None) -> list[int]:
        """Token ids of ``prompt`` or of ``chat`` rendered as Generate renders it."""
        response = self.stub.Tokenize(tokenize_request(prompt, chat, add_special_tokens), timeout=timeout,
                                      metadata=call_metadata(self._token, metadata))
        return list(response.token_ids)

    def detokenize(self, token_ids: Iterable[int], *, skip_special_tokens: bool | None = None,
                   timeout: float | None = None, metadata: Metadata | None = None) -> str:
        response = self.stub.Detokenize(detokenize_request(token_ids, skip_special_tokens), timeout=timeout,
                                        metadata=call_metadata(self._token, metadata))
        return str(response.text)

    def abort(self, request_id: str, *, timeout: float | None = None, metadata: Metadata | None = None) -> bool:
        """Aborts a running request by id (from any connection); False when none was running."""
        response = self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout,
                                   metadata=call_metadata(self._token, metadata))
        return bool(response.aborted)

    def get_load(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> pb.GetLoadResponse:
        return self.stub.GetLoad(pb.GetLoadRequest(), timeout=timeout, metadata=call_metadata(self._token, metadata))

    def reset_prefix_cache(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> bool:
        response = self.stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(), timeout=timeout,
                                              metadata=call_metadata(self._token, metadata))
        return bool(response.reset)

    def health(self, service: str = HEALTH_SERVICE, *, timeout: float | None = 5.0) -> bool:
        """True when the server's health service says SERVING; RPC errors propagate."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                      metadata=call_metadata(self._token, None))
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
