"""A client that knows nothing but gRPC server reflection v1: it lists services, fetches their
descriptors and builds request/response classes from them (no generated stubs)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as wire  # v1 messages are the same on the wire

V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


class ReflectionClient:
    def __init__(self, channel: grpc.Channel, metadata: list[tuple[str, str]] | None = None) -> None:
        self.channel = channel
        self.metadata = metadata
        self.call = channel.stream_stream(V1_METHOD, request_serializer=wire.ServerReflectionRequest.SerializeToString,
                                          response_deserializer=wire.ServerReflectionResponse.FromString)
        self.pool = descriptor_pool.DescriptorPool()

    def ask(self, **request: Any) -> Any:
        (response,) = list(self.call(iter([wire.ServerReflectionRequest(**request)]), timeout=10,
                                     metadata=self.metadata))
        return response

    def services(self) -> list[str]:
        return [s.name for s in self.ask(list_services="").list_services_response.service]

    def describe(self, symbol: str) -> Any:
        """The service descriptor of ``symbol``, its files added to this client's pool."""
        response = self.ask(file_containing_symbol=symbol)
        protos = [descriptor_pb2.FileDescriptorProto.FromString(b)
                  for b in response.file_descriptor_response.file_descriptor_proto]
        for proto in sorted(protos, key=lambda p: len(p.dependency)):  # dependencies first
            try:
                self.pool.FindFileByName(proto.name)
            except KeyError:
                self.pool.Add(proto)
        return self.pool.FindServiceByName(symbol)

    def unary(self, service: str, method: str, **fields: Any) -> Any:
        """Calls a unary method with a request built from reflected descriptors."""
        desc = self.describe(service).methods_by_name[method]
        request_cls = message_factory.GetMessageClass(desc.input_type)
        response_cls = message_factory.GetMessageClass(desc.output_type)
        call = self.channel.unary_unary(f"/{service}/{method}", request_serializer=request_cls.SerializeToString,
                                        response_deserializer=response_cls.FromString)
        return call(request_cls(**fields), timeout=30, metadata=self.metadata)
