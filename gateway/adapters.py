"""``/v1/models`` (base model + every adapter) and vLLM's adapter routes:
``POST /v1/load_lora_adapter {lora_name, lora_path}`` and ``POST /v1/unload_lora_adapter {lora_name}``,
answered as vLLM does: plain text ``Success: LoRA adapter '<name>' added successfully.``."""

from __future__ import annotations

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from loraplex.gateway.errors import OpenAIError, from_grpc
from loraplex.gateway.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from loraplex.gateway.responses import ModelCard, ModelList
from loraplex.gateway.security import read_json
from loraplex.gateway.serving import validate
from loraplex.gateway.state import GatewayState


async def list_models(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    info = await state.model_info()
    try:
        adapters = await state.client.list_adapters()
    except grpc.RpcError as exc:
        raise from_grpc(exc) from None
    cards = [ModelCard(id=info.name, root=info.name, max_model_len=info.max_model_len or None)]
    cards += [ModelCard(id=a.name, root=a.source, parent=info.name) for a in adapters]
    return JSONResponse(ModelList(data=cards).model_dump())


async def load_lora_adapter(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    req = validate(LoadLoraAdapterRequest, await read_json(request, state.config.max_request_bytes))
    if not req.lora_name or not req.lora_path:
        raise OpenAIError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                          param="lora_name" if not req.lora_name else "lora_path", code="invalid_value")
    try:
        await state.client.load_adapter(req.lora_name, req.lora_path, replace=req.load_inplace, pin=req.pin)
    except grpc.RpcError as exc:
        raise _load_error(exc, req.lora_name) from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


def _load_error(exc: grpc.RpcError, name: str) -> OpenAIError:
    if exc.code() == grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
        return OpenAIError(400, f"The lora adapter '{name}' has already been loaded. If you want to load "
                                "the adapter in place, set 'load_inplace' to True.",
                           param="lora_name", code="already_exists")
    return from_grpc(exc)


async def unload_lora_adapter(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    req = validate(UnloadLoraAdapterRequest, await read_json(request, state.config.max_request_bytes))
    if not req.lora_name:
        raise OpenAIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.",
                          param="lora_name", code="invalid_value")
    try:
        await state.client.unload_adapter(req.lora_name)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            raise OpenAIError(404, f"The lora adapter '{req.lora_name}' cannot be found.",
                              param="lora_name", code="adapter_not_found") from None
        raise from_grpc(exc) from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
