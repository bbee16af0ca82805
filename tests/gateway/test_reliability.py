"""The gateway's answers to hostile or unlucky traffic (issue 11), over real HTTP: lone surrogates,
huge prompt lists, a full backend queue, a backend outage, and what error texts may reveal."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from fake_backend import BASE, start_fake_backend
from gateway_harness import GatewayHarness

from loraplex.gateway.config import GatewayConfig

USER = [{"role": "user", "content": "hi"}]
TOOL: dict[str, Any] = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
LONE = "a\ud800b"


def post(gw: GatewayHarness, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    # ensure_ascii keeps the lone surrogate as the JSON escape "\ud800", as a hostile client sends it
    return httpx.post(gw.url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=30, **kw)


SURROGATE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": LONE}]}, "messages.[0].content"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": [{"type": "text",
                                                                                        "text": LONE}]}]},
     "messages.[0].content.[0].text"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x", "name": LONE}]},
     "messages.[0].name"),
    ("/v1/chat/completions", {"model": LONE, "messages": USER}, "model"),
    ("/v1/chat/completions", {"model": BASE, "messages": USER, "stop": [LONE]}, "stop.[0]"),
    ("/v1/chat/completions", {"model": BASE, "messages": USER,
                              "tools": [{**TOOL, "function": {**TOOL["function"], "description": LONE}}]},
     "tools.[0].function.description"),
    ("/v1/chat/completions", {"model": BASE, "messages": USER, "chat_template_kwargs": {"k": LONE}},
     "chat_template_kwargs.k"),
    ("/v1/completions", {"model": BASE, "prompt": LONE}, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": ["ok", LONE]}, "prompt.[1]"),
    ("/v1/load_lora_adapter", {"lora_name": LONE, "lora_path": "/x"}, "lora_name"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": LONE}, "lora_path"),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATE_CASES)
def test_lone_surrogates_are_400_naming_the_field(gw: GatewayHarness, path: str, body: dict[str, Any],
                                                  param: str) -> None:
    r = post(gw, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]


def test_a_request_without_model_is_400(gw: GatewayHarness) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [("/v1/chat/completions", {"messages": USER}),
                                               ("/v1/completions", {"prompt": "hi"})]
    for path, body in cases:
        r = post(gw, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text


def test_prompts_times_n_is_bounded() -> None:
    gw = GatewayHarness(GatewayConfig(max_choices=8))
    try:
        start = time.monotonic()
        r = post(gw, "/v1/completions", {"model": BASE, "prompt": ["Hello"] * 3000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert time.monotonic() - start < 2 and gw.servicer.requests == []  # refused before any backend call
        r = post(gw, "/v1/completions", {"model": BASE, "prompt": ["a", "b", "c"], "n": 3})
        assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]
        assert post(gw, "/v1/chat/completions", {"model": BASE, "messages": USER, "n": 9}).status_code == 400
        assert post(gw, "/v1/completions", {"model": BASE, "prompt": ["a", "b"], "n": 4}).status_code == 200
    finally:
        gw.close()


def test_a_full_backend_queue_is_429_at_once(gw: GatewayHarness) -> None:
    """One refused call answers the request; calls still waiting for their first token do not delay it."""
    start = time.monotonic()
    r = post(gw, "/v1/completions", {"model": BASE, "prompt": ["WAIT", "FULL"]})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
    assert time.monotonic() - start < 1.5
    assert gw.wait_until(lambda: gw.servicer.running == 0)  # the waiting call was cancelled


def test_models_expose_no_server_paths(gw: GatewayHarness) -> None:
    text = httpx.get(gw.url + "/v1/models", timeout=10).text
    assert "/adapters/" not in text  # the fake backend's adapter sources
    card = httpx.get(gw.url + "/v1/models/reverse", timeout=10).json()
    assert card["root"] == "reverse" and card["parent"] == BASE


def test_unavailable_answers_name_no_backend_address() -> None:
    gw = GatewayHarness()
    gw.run(gw.grpc_server.stop(0))
    try:
        for r in [post(gw, "/v1/chat/completions", {"model": "reverse", "messages": USER}),
                  httpx.get(gw.url + "/health", timeout=10), httpx.get(gw.url + "/v1/models", timeout=10)]:
            assert r.status_code == 503, r.text
            assert "127.0.0.1" not in r.text and "ipv4" not in r.text and "connect" not in r.text, r.text
    finally:
        gw.grpc_server, gw.backend, _ = gw.run(start_fake_backend(int(gw.config.backend[0].rsplit(":", 1)[1])))
        gw.close()


def test_the_gateway_recovers_within_seconds_after_an_outage() -> None:
    """gRPC's default reconnect backoff grows to 120 s; the gateway caps it, so after a 20 s outage
    the first request that succeeds comes within a few seconds of the backend's return."""
    gw = GatewayHarness()
    port = int(gw.config.backend[0].rsplit(":", 1)[1])
    body = {"model": BASE, "prompt": "hi"}
    try:
        assert post(gw, "/v1/completions", body).status_code == 200
        gw.run(gw.grpc_server.stop(0))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # traffic during the outage, as in production
            assert post(gw, "/v1/completions", body).status_code == 503
            time.sleep(1)
        gw.grpc_server, gw.backend, _ = gw.run(start_fake_backend(port))
        back = time.monotonic()
        while post(gw, "/v1/completions", body).status_code != 200:
            assert time.monotonic() - back < 4, "the gateway did not reconnect within 4 s"
            time.sleep(0.1)
    finally:
        gw.close()
