"""gRPC server reflection under both names clients use: ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection ships only v1alpha. The v1 protocol is the same messages under another
package, so one servicer answers both; the v1 file descriptor (v1alpha's, renamed) is added
to the descriptor pool so that a v1 client can describe the v1 service too. Requests whose
bytes do not parse get INVALID_ARGUMENT and one rate-limited log line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async, reflection_pb2

from loraplex.backend.server.errors import MalformedRequest, refuse_malformed, tolerant_deserializer

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1, V1ALPHA)
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds v1alpha's file descriptor, renamed to package ``grpc.reflection.v1``, to ``pool`` (once)."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for f in message.field:
            if f.type_name:
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        for m in service.method:
            m.input_type, m.output_type = m.input_type.replace(old, new), m.output_type.replace(old, new)
    pool.Add(proto)


def reflection_handlers(service_names: tuple[str, ...]) -> list[grpc.GenericRpcHandler]:
    """Handlers of both reflection services, listing ``service_names`` plus themselves."""
    pool = descriptor_pool.Default()
    _register_v1_descriptor(pool)
    servicer = _async.ReflectionServicer((*service_names, *SERVICE_NAMES), pool=pool)
    parse = tolerant_deserializer(reflection_pb2.ServerReflectionRequest)

    async def info(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def parsed() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, MalformedRequest):
                    await refuse_malformed(context, "reflection", request)
                yield request

        async for response in servicer.ServerReflectionInfo(parsed(), context):
            yield response

    method = grpc.stream_stream_rpc_method_handler(
        info, request_deserializer=parse, response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    return [grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method}) for name in SERVICE_NAMES]
