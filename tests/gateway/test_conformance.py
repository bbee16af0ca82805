"""OpenAI conformance over real HTTP: the OpenAPI document (validated, and a bounded schemathesis run
against it), ``GET /v1/models/{model}``, no ``system_fingerprint: null``, ``x-request-id``,
unsupported endpoints and parameters in OpenAI's error shape."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
import schemathesis
from fake_backend import BASE
from gateway_harness import GatewayHarness
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate as validate_spec
from schemathesis import checks

USER = [{"role": "user", "content": "hello"}]


def client(gw: GatewayHarness) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_openapi_document_validates_and_covers_the_routes(gw: GatewayHarness) -> None:
    doc = httpx.get(gw.url + "/openapi.json", timeout=10).json()
    validate_spec(doc)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}",
            "/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= set(doc["paths"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["required"]


def test_openapi_document_needs_the_key_when_one_is_set(gw_secure: GatewayHarness) -> None:
    assert httpx.get(gw_secure.url + "/openapi.json", timeout=10).status_code == 401
    r = httpx.get(gw_secure.url + "/openapi.json", headers={"Authorization": "Bearer sekret"}, timeout=10)
    assert r.status_code == 200 and r.json()["security"] == [{"bearer": []}]
    validate_spec(r.json())


CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance]


def test_schemathesis_finds_no_5xx_and_no_response_off_the_document() -> None:
    """A bounded run (30 examples per operation, about 300 requests) on a gateway of its own
    (schemathesis loads and unloads random adapters)."""
    gw = GatewayHarness()
    try:
        schema = schemathesis.openapi.from_url(gw.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
        assert len(operations) >= 10
        for operation in operations:
            _fuzz(operation)
    finally:
        gw.close()


def _fuzz(operation: Any) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        case.call_and_validate(checks=CHECKS, timeout=30)

    run()


def test_retrieve_one_model(gw: GatewayHarness) -> None:
    c = client(gw)
    assert c.models.retrieve(BASE).id == BASE
    card = c.models.retrieve("reverse")
    assert (card.id, card.owned_by, (card.model_extra or {})["parent"]) == ("reverse", "loraplex", BASE)
    with pytest.raises(openai.NotFoundError) as info:
        c.models.retrieve("nope")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_no_system_fingerprint_null(gw: GatewayHarness) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": BASE, "messages": USER}, timeout=30)
    assert "system_fingerprint" not in r.json()
    r = httpx.post(gw.url + "/v1/completions", json={"model": BASE, "prompt": "x", "stream": True}, timeout=30)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert chunks and all("system_fingerprint" not in c for c in chunks)


def test_x_request_id_is_honoured_generated_and_sent_to_the_backend(gw: GatewayHarness) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": BASE, "messages": USER, "n": 2},
                   headers={"x-request-id": "trace-me-42"}, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-42"
    assert {q.request_id for q in gw.servicer.requests[-2:]} == {"trace-me-42-0", "trace-me-42-1"}
    generated = httpx.get(gw.url + "/v1/models", timeout=10).headers["x-request-id"]
    other = httpx.get(gw.url + "/v1/models", timeout=10).headers["x-request-id"]
    assert generated and generated != other
    bad = httpx.get(gw.url + "/v1/models/nope", headers={"x-request-id": "bad id\twith space"}, timeout=10)
    assert bad.status_code == 404 and bad.headers["x-request-id"] not in ("", "bad id\twith space")


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/responses"])
def test_unsupported_endpoints_answer_openai_errors(gw: GatewayHarness, path: str) -> None:
    r = httpx.post(gw.url + path, json={"model": BASE, "input": "x"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unsupported_endpoint"
    assert "not supported" in r.json()["error"]["message"]


def test_embeddings_through_the_sdk_is_a_typed_error(gw: GatewayHarness) -> None:
    with pytest.raises(openai.NotFoundError):
        client(gw).embeddings.create(model=BASE, input="x")


REFUSED = [("reasoning_effort", "low"), ("service_tier", "flex"), ("store", True),
           ("metadata", {"k": "v"}), ("modalities", ["text", "audio"]), ("audio", {"voice": "x"}),
           ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}),
           ("verbosity", "low"), ("functions", [{"name": "f"}]), ("function_call", "auto")]
HONOURED = [("service_tier", "auto"), ("parallel_tool_calls", True), ("parallel_tool_calls", False),
            ("store", False), ("modalities", ["text"]),
            ("reasoning_effort", None), ("metadata", None)]


@pytest.mark.parametrize(("name", "value"), REFUSED)
def test_unsupported_parameters_are_refused_naming_them(gw: GatewayHarness, name: str, value: Any) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": BASE, "messages": USER, name: value}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    assert r.json()["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize(("name", "value"), HONOURED)
def test_values_the_server_honours_are_accepted(gw: GatewayHarness, name: str, value: Any) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": BASE, "messages": USER, name: value}, timeout=30)
    assert r.status_code == 200, r.text


def test_single_tool_call_is_refused_when_no_call_is_forced(gw: GatewayHarness) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"model": BASE, "messages": USER, "tools": [tool], "parallel_tool_calls": False}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "parallel_tool_calls", r.text


def test_completions_refuse_an_unsupported_service_tier(gw: GatewayHarness) -> None:
    r = httpx.post(gw.url + "/v1/completions", json={"model": BASE, "prompt": "x", "service_tier": "priority"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "service_tier"


def test_prompt_token_ids_off_the_vocabulary_are_a_400(gw: GatewayHarness) -> None:
    """Schemathesis once sent ``"prompt": [3151844, 3151844]``: the backend's INVALID_ARGUMENT must
    come back as OpenAI's 400, never a 500."""
    r = httpx.post(gw.url + "/v1/completions", json={"model": BASE, "prompt": [3151844, 3151844]}, timeout=30)
    assert r.status_code == 400, r.text
    assert "vocabulary" in r.json()["error"]["message"]
