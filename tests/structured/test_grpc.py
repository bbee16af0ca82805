"""gRPC: ``SamplingParameters.structured_output`` through a real server (demo model), concurrent
streams with different constraints and adapters; bad constraints are INVALID_ARGUMENT naming the
proto field, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import grpc
import jsonschema
import pytest

from loraplex.backend.demo import DEMO_MODEL_DIR, expected_output
from loraplex.clients import AsyncClient, Client, pb
from tests.server.harness import RunningServer, chat_request, start_server, stop_server

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(), reason="demo model not built")

SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 5},
                                           "n": {"type": "integer", "minimum": 1, "maximum": 9},
                                           "ok": {"type": "boolean"}},
          "required": ["word", "n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    rs = start_server()
    yield rs
    stop_server(rs)


def constrained(adapter: str, so: pb.StructuredOutput, text: str = "Hello world", **params) -> pb.GenerateRequest:
    req = chat_request(text, adapter=adapter, max_tokens=64, **params)
    req.params.structured_output.CopyFrom(so)
    return req


def test_concurrent_streams_each_keep_their_own_constraint_and_adapter(server: RunningServer) -> None:
    cases = [
        ("upper", pb.StructuredOutput(json_schema=json.dumps(SCHEMA)), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ("reverse", pb.StructuredOutput(regex=r"[a-z]{1,6}-\d{3}"), lambda t: re.fullmatch(r"[a-z]{1,6}-\d{3}", t)),
        ("", pb.StructuredOutput(choice=pb.Choice(values=["red", "green", "blue"])), lambda t: t in ("red", "green", "blue")),
        ("think", pb.StructuredOutput(grammar='root ::= "<" [a-z]{1,8} ">"'), lambda t: re.fullmatch("<[a-z]{1,8}>", t)),
        ("tools", pb.StructuredOutput(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]

    async def run() -> list[pb.GenerateResponse]:
        async with AsyncClient(server.target) as client:
            texts = ["Hello world"] * 4 + ["Paris"]
            reqs = [constrained(a, so, t, temperature=temp) for (a, so, _), t in zip(cases, texts, strict=True)
                    for temp in (0.0, 1.0)]
            reqs.append(chat_request("Hello world", adapter="reverse"))  # unconstrained, in the same batch
            return await asyncio.gather(*(client.generate(r, timeout=120) for r in reqs))

    results = asyncio.run(run())
    for i, (_adapter, _so, check) in enumerate(cases):
        for out in results[2 * i:2 * i + 2]:
            if i == 4 and out.finish_reason == "length":  # json_object at temperature 1 may not close
                continue
            assert out.finish_reason == "stop", out.text
            assert check(out.text) is not False, out.text
    assert results[-1].text == expected_output("reverse", "Hello world")


BAD = [
    (pb.StructuredOutput(json_schema='{"type": "foo"}'), "params.structured_output.json_schema"),
    (pb.StructuredOutput(json_schema="{"), "params.structured_output.json_schema"),
    (pb.StructuredOutput(regex="(unclosed"), "params.structured_output.regex"),
    (pb.StructuredOutput(grammar="root ::= missing"), "params.structured_output.grammar"),
    (pb.StructuredOutput(choice=pb.Choice(values=[])), "params.structured_output.choice.values"),
    (pb.StructuredOutput(choice=pb.Choice(values=["a", ""])), "params.structured_output.choice.values"),
    (pb.StructuredOutput(structural_tag="not json"), "params.structured_output.structural_tag"),
    (pb.StructuredOutput(), "params.structured_output"),
]


@pytest.mark.parametrize(("so", "field"), BAD)
def test_bad_constraints_are_invalid_argument_naming_the_field(server: RunningServer, so, field) -> None:
    with Client(server.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate(constrained("upper", so), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + ":"), info.value.details()
        ok = client.generate(chat_request("Hello world", adapter="upper"), timeout=60)
    assert ok.text == "HELLO WORLD"
    assert server.engine.engine.kv.num_used_blocks == 0
