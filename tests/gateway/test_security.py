"""API key on every route (but /health), request size limits, CORS only when configured."""

from __future__ import annotations

import hmac

import httpx
import openai
import pytest
from fake_backend import BASE
from gateway_harness import GatewayHarness

from loraplex.gateway.config import GatewayConfig
from loraplex.gateway.security import key_matches
from tests.helpers import DigestSpy, GuardedKey

ROUTES = [("GET", "/v1/models", None), ("GET", "/metrics", None),
          ("POST", "/v1/completions", {"model": BASE, "prompt": "x"}),
          ("POST", "/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x"}]}),
          ("POST", "/v1/load_lora_adapter", {"lora_name": "n", "lora_path": "/adapters/x"}),
          ("POST", "/v1/unload_lora_adapter", {"lora_name": "n"})]


def test_key_matches() -> None:
    assert key_matches("Bearer sekret", "sekret") and key_matches("bearer sekret", "sekret")
    assert not key_matches("Bearer sekre", "sekret") and not key_matches(None, "sekret")
    assert not key_matches("Basic sekret", "sekret") and not key_matches("sekret", "sekret")


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_needs_the_key(gw_secure: GatewayHarness, method: str, path: str, body: object) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.request(method, gw_secure.url + path, json=body, headers=headers)
        assert r.status_code == 401, (path, headers)
        assert r.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.request(method, gw_secure.url + path, json=body, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code != 401


def test_sdk_sees_authentication_error(gw_secure: GatewayHarness) -> None:
    bad = openai.OpenAI(base_url=gw_secure.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=gw_secure.url + "/v1", api_key="sekret", max_retries=0)
    assert good.completions.create(model=BASE, prompt="ok").choices[0].text == "ok"


def test_health_is_open(gw_secure: GatewayHarness) -> None:
    assert httpx.get(gw_secure.url + "/health").status_code == 200


def test_body_size_limit(gw_secure: GatewayHarness) -> None:
    auth = {"Authorization": "Bearer sekret"}
    body = {"model": BASE, "prompt": "x" * 5000}
    r = httpx.post(gw_secure.url + "/v1/completions", json=body, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: the limit holds while reading
        yield b'{"model": "fake-base", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(gw_secure.url + "/v1/completions", content=chunks(), headers=auth)
    assert r.status_code == 413


def test_cors_only_for_configured_origins(gw_secure: GatewayHarness, gw: GatewayHarness) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(gw_secure.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    evil = httpx.options(gw_secure.url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert evil.headers.get("access-control-allow-origin") is None
    off = httpx.get(gw.url + "/v1/models", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in off.headers


def test_every_key_check_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every route of the app (read from the app itself, so a new route is covered; /health stays
    open) checks the key through ``hmac.compare_digest`` on bytes with the configured key, and
    nothing compares the key with ``==``. No timing measurement: the nanoseconds a short-circuit
    comparison differs by are lost in an HTTP request's milliseconds, so it could not fail."""
    key = GuardedKey("sekret-0123456789")
    gw = GatewayHarness(GatewayConfig(api_key=key))
    try:
        routes = [(method, route.path.replace("{model:path}", BASE)) for route in gw.app.routes
                  for method in sorted(getattr(route, "methods", None) or ()) if method != "HEAD"]
        assert {path for _, path in routes} >= {path for _, path, _ in ROUTES} | {"/openapi.json", "/v1/responses"}
        spy = DigestSpy()
        monkeypatch.setattr(hmac, "compare_digest", spy)
        for method, path in routes:
            for given in ("x" * len(key), str(key)[:-1], str(key) + "x", "wrong", str(key)):
                spy.calls.clear()
                r = httpx.request(method, gw.url + path, json={}, headers={"Authorization": f"Bearer {given}"})
                if path == "/health":
                    assert r.status_code == 200 and spy.calls == []
                    continue
                assert (r.status_code == 401) == (given != str(key)), (method, path, given, r.status_code)
                assert spy.calls == [(given.encode(), str(key).encode())], (method, path, given, spy.calls)
                assert all(type(arg) is bytes for arg in spy.calls[0])
    finally:
        gw.close()
