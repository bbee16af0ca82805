"""Clients of the loraplex gRPC service: generated stubs plus a small sync and asyncio client.

    from loraplex.clients import AsyncClient, Client, pb

``pb`` is the generated ``inference_pb2`` module (messages); ``pb_grpc`` the
service stubs. Nothing here imports torch, transformers or the server.
"""

from loraplex.clients.aio import AsyncClient
from loraplex.clients.client import Client
from loraplex.clients.common import HEALTH_SERVICE, GenerateResult
from loraplex.clients.v1 import inference_pb2 as pb
from loraplex.clients.v1 import inference_pb2_grpc as pb_grpc

__all__ = ["HEALTH_SERVICE", "AsyncClient", "Client", "GenerateResult", "pb", "pb_grpc"]
