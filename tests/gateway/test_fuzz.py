"""Malformed and random JSON bodies never get a 5xx and never break the gateway."""

from __future__ import annotations

import json
from typing import Any

import httpx
from gateway_harness import GatewayHarness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs",
        "top_logprobs", "stream", "stream_options", "tools", "tool_choice", "echo", "top_k", "min_p",
        "repetition_penalty", "chat_template_kwargs", "max_completion_tokens", "lora_name", "lora_path"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | JSON},
                                optional={"content": JSON | st.text(max_size=10), "tool_calls": JSON,
                                          "tool_call_id": JSON})
BODY = st.dictionaries(st.sampled_from(KEYS), JSON, max_size=8) | st.fixed_dictionaries(
    {"model": st.sampled_from(["fake-base", "reverse", "nope"]), "messages": st.lists(MESSAGE, max_size=3)},
    optional={k: JSON for k in KEYS[3:]})
PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter",
                         "/v1/unload_lora_adapter"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=PATHS, body=BODY | JSON)
def test_random_bodies_never_5xx(gw: GatewayHarness, path: str, body: Any) -> None:
    if path.endswith("lora_adapter") and isinstance(body, dict) and isinstance(body.get("lora_name"), str):
        body["lora_name"] = "fuzz-" + body["lora_name"]  # leave the fixture's adapters alone
    r = httpx.post(gw.url + path, content=json.dumps(body), timeout=30)  # NaN / Infinity included
    assert r.status_code < 500, (r.status_code, r.text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_random_bytes_are_400(gw: GatewayHarness, raw: bytes) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", content=raw, timeout=30)
    assert r.status_code == 400 or (r.status_code < 500 and raw.strip().startswith(b"{")), r.text
