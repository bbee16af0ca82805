"""The OpenAPI document at ``/openapi.json``: the routes take raw requests (the body is read with a
size bound and validated by hand, so errors keep OpenAI's shape), so their request and response
schemas are declared here from the same pydantic models the handlers use."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.responses import Response

from loraplex.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from loraplex.gateway.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)

OPENAPI_PATH = "/openapi.json"
UNSUPPORTED_ROUTES = ("/v1/embeddings", "/v1/responses")
_REF = "#/components/schemas/{model}"
_MODELS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, LoadLoraAdapterRequest,
                                  UnloadLoraAdapterRequest, ChatCompletionResponse, CompletionResponse,
                                  ErrorResponse, ModelCard, ModelList]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_ERROR = {"description": "An error in OpenAI's shape", "content": _json(_ref(ErrorResponse))}
_SSE = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events "
                                                                           "('data: <chunk>' ... 'data: [DONE]')"}}}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}

_DOCS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"summary": "Create a chat completion", "body": ChatCompletionRequest,
                             "ok": {**_json(_ref(ChatCompletionResponse)), **_SSE}},
    "/v1/completions": {"summary": "Create a completion", "body": CompletionRequest,
                        "ok": {**_json(_ref(CompletionResponse)), **_SSE}},
    "/v1/models": {"summary": "List the base model and every adapter", "ok": _json(_ref(ModelList))},
    "/v1/models/{model}": {"summary": "Retrieve one model or adapter", "ok": _json(_ref(ModelCard))},
    "/v1/load_lora_adapter": {"summary": "Load a LoRA adapter (vLLM's route)", "body": LoadLoraAdapterRequest,
                              "ok": _TEXT},
    "/v1/unload_lora_adapter": {"summary": "Unload a LoRA adapter (vLLM's route)",
                                "body": UnloadLoraAdapterRequest, "ok": _TEXT},
    "/health": {"summary": "200 when a backend serves, else 503", "ok": {}},
    "/metrics": {"summary": "Prometheus metrics", "ok": _TEXT},
    **{path: {"summary": "Not supported: answers OpenAI's error shape", "ok": None} for path in UNSUPPORTED_ROUTES},
}


def route_doc(path: str) -> dict[str, Any]:
    """``add_api_route`` keywords documenting ``path``: summary, request body, responses."""
    doc = _DOCS[path.replace("{model:path}", "{model}")]
    responses: dict[int | str, Any] = {"default": _ERROR}
    if doc["ok"] is not None:
        responses[200] = {"description": "Success", **({"content": doc["ok"]} if doc["ok"] else {})}
    extra: dict[str, Any] = {}
    if "body" in doc:
        extra["requestBody"] = {"required": True, "content": _json(_ref(doc["body"]))}
    if "{model" in path:
        extra["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
                                "description": "the base model's id or an adapter's name"}]
    # response_class without a media type: FastAPI adds no content the route does not declare
    return {"summary": doc["summary"], "responses": responses, "openapi_extra": extra or None,
            "response_class": Response}


def install_openapi(app: FastAPI, *, secured: bool) -> None:
    """``app.openapi()`` builds the document once, with the models' schemas as components; ``secured``:
    every route but ``/health`` needs the bearer key."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                   description="OpenAI-compatible REST gateway of a loraplex gRPC server.")
            _, definitions = models_json_schema([(m, "validation") for m in _MODELS], ref_template=_REF)
            document.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
            if secured:
                document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                document["security"] = [{"bearer": []}]
                document["paths"]["/health"]["get"]["security"] = []
            app.openapi_schema = _without_fastapi_422(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _without_fastapi_422(document: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents a 422 for path parameters; the gateway answers 400 (and ``default`` covers it)."""
    for item in document.get("paths", {}).values():
        for operation in item.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return document
