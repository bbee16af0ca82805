"""``/v1/models`` (base model + every adapter) and vLLM's adapter routes:
``POST /v1/load_lora_adapter {lora_name, lora_path}`` and ``POST /v1/unload_lora_adapter {lora_name}``,
answered as vLLM does: plain text ``Success: LoRA adapter '<name>' added successfully.``.

With several backends, loads and unloads go to every healthy backend (any replica can then
serve any adapter; residency follows the routing affinity) and succeed only when all do, else
the first backend's error answers; ``/v1/models`` lists the union of their adapters."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from loraplex.gateway.errors import OpenAIError, from_grpc, model_not_found
from loraplex.gateway.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from loraplex.gateway.responses import ModelCard, ModelList
from loraplex.gateway.security import read_json
from loraplex.gateway.serving import validate
from loraplex.gateway.state import BackendClient, GatewayState

T = TypeVar("T")


async def _on_every_backend(state: GatewayState, call: Callable[[BackendClient], Awaitable[T]]) -> list[T | BaseException]:
    """``call`` on every candidate backend at once; results (or exceptions) in backend order."""
    backends = state.router.candidates()
    return await asyncio.gather(*(call(b.client) for b in backends), return_exceptions=True)


def _first_error(results: list[T | BaseException]) -> BaseException | None:
    return next((r for r in results if isinstance(r, BaseException)), None)


async def _model_cards(state: GatewayState) -> list[ModelCard]:
    """The base model, then every adapter (by name); no server paths (``root`` is the model's own id)."""
    info = await state.model_info()
    results = await _on_every_backend(state, lambda c: c.list_adapters())
    lists = [r for r in results if not isinstance(r, BaseException)]
    if not lists:
        error = _first_error(results)
        if isinstance(error, grpc.RpcError):
            raise from_grpc(error) from None
        assert error is not None
        raise error
    names = sorted({a.name for listed in lists for a in listed})
    cards = [ModelCard(id=info.name, root=info.name, max_model_len=info.limits.max_model_len or None)]
    return cards + [ModelCard(id=name, root=name, parent=info.name) for name in names]


async def list_models(request: Request) -> Response:
    cards = await _model_cards(request.app.state.gateway)
    return JSONResponse(ModelList(data=cards).model_dump())


async def retrieve_model(request: Request) -> Response:
    """``GET /v1/models/{model}``: one card, or 404 in OpenAI's shape."""
    model = request.path_params["model"]
    card = next((c for c in await _model_cards(request.app.state.gateway) if c.id == model), None)
    if card is None:
        raise model_not_found(model)
    return JSONResponse(card.model_dump())


async def load_lora_adapter(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    req = validate(LoadLoraAdapterRequest, await read_json(request, state.config.max_request_bytes))
    if not req.lora_name or not req.lora_path:
        raise OpenAIError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                          param="lora_name" if not req.lora_name else "lora_path", code="invalid_value")
    results = await _on_every_backend(
        state, lambda c: c.load_adapter(req.lora_name, req.lora_path, replace=req.load_inplace, pin=req.pin))
    error = _first_error(results)
    if isinstance(error, grpc.RpcError):
        raise _load_error(error, req.lora_name) from None
    if error is not None:
        raise error
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
    error = _first_error(await _on_every_backend(state, lambda c: c.unload_adapter(req.lora_name)))
    if isinstance(error, grpc.RpcError):
        if error.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            raise OpenAIError(404, f"The lora adapter '{req.lora_name}' cannot be found.",
                              param="lora_name", code="adapter_not_found") from None
        raise from_grpc(error) from None
    if error is not None:
        raise error
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
