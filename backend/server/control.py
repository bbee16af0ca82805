"""Protobuf edge of the control RPCs (Tokenize, Detokenize, Abort, GetLoad, ResetPrefixCache).

Chat input for Tokenize goes through ``convert.render_chat_from_pb``, the very
function Generate renders chat with, so both count the same tokens.
"""

from __future__ import annotations

from typing import Any

from loraplex.backend.engine.request import ChatInput
from loraplex.backend.server import convert
from loraplex.backend.server.messages import Msg
from loraplex.clients.v1 import inference_pb2 as pb
from loraplex.errors import InvalidRequestError


def tokenize_input(request: pb.TokenizeRequest) -> tuple[str | None, ChatInput | None]:
    """(prompt text, or chat input rendered as Generate renders it) of a Tokenize request."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidRequestError("prompt", Msg.EMPTY_PROMPT.value)
        return request.prompt, None
    if kind == "chat":
        return None, convert.chat_from_pb(request.chat)
    raise InvalidRequestError("input", Msg.TOKENIZE_INPUT_MISSING.value)


def add_special_tokens(request: pb.TokenizeRequest) -> bool:
    return request.add_special_tokens if request.HasField("add_special_tokens") else True


def skip_special_tokens(request: pb.DetokenizeRequest) -> bool:
    return request.skip_special_tokens if request.HasField("skip_special_tokens") else True


def abort_request_id(request: pb.AbortRequest) -> str:
    if not request.request_id:
        raise InvalidRequestError("request_id", Msg.REQUEST_ID_EMPTY.value)
    return convert.request_id_from_pb(request.request_id)


def load_to_pb(report: Any) -> pb.GetLoadResponse:
    """``GetLoadResponse`` from the engine's ``LoadReport``."""
    return pb.GetLoadResponse(running=report.running, waiting=report.waiting, kv_usage=report.kv_usage,
                              kv_blocks_used=report.kv_blocks_used, kv_blocks_total=report.kv_blocks_total,
                              resident_adapters=list(report.resident_adapters),
                              loading_adapters=list(report.loading_adapters), max_loras=report.max_loras)
