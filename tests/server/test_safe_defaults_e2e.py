"""Issue 11 over real servers: safe defaults, deep JSON, min_tokens and EOS, a bad --model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from loraplex.backend.cli_args import check_model_source
from loraplex.backend.demo import DEMO_ADAPTERS, expected_output
from loraplex.backend.server.config import ServerConfig
from loraplex.clients import Client
from loraplex.config import LoRAConfig
from loraplex.errors import ConfigError
from tests.server.harness import RunningServer, chat_request, demo_tokenizer, start_server, stop_server


def test_servers_listen_on_loopback_by_default() -> None:
    config = ServerConfig()
    assert config.host == "127.0.0.1" and config.metrics_host == "127.0.0.1"
    assert LoRAConfig().allow_hub_adapters is False and LoRAConfig().adapter_roots == []


def test_roots_without_the_demo_dir_start_and_confine(tmp_path: Path) -> None:
    rs = start_server({"adapter_roots": [str(tmp_path)]})
    try:
        with Client(rs.target) as client:
            assert client.generate(chat_request("abc", "reverse"), timeout=30).text == expected_output("reverse", "abc")
            client.load_adapter("demo-copy", str(DEMO_ADAPTERS["upper"]), timeout=30)  # built-in root
            codes = set()
            for source in (str(Path(sys.prefix)), str(tmp_path / "missing"), "/proc/self/root/etc", "org/name"):
                with pytest.raises(grpc.RpcError) as err:
                    client.load_adapter("x", source, timeout=30)
                codes.add(err.value.code())
            assert codes == {grpc.StatusCode.PERMISSION_DENIED}
            for name in ("..", "x/../y", "a" * 200, rs.engine.model_name):
                with pytest.raises(grpc.RpcError) as err:
                    client.load_adapter(name, str(DEMO_ADAPTERS["upper"]), timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    finally:
        stop_server(rs)


@pytest.mark.parametrize("field", ["tools", "kwargs"])
def test_deeply_nested_json_is_invalid_argument(demo: RunningServer, field: str) -> None:
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000
    req = chat_request("hi")
    if field == "tools":
        req.chat.tools_json.append("[" * 100_000 + "]" * 100_000)
    else:
        req.chat.chat_template_kwargs_json = deep
    with Client(demo.target, options=[("grpc.max_send_message_length", 2**24)]) as client, \
            pytest.raises(grpc.RpcError) as err:
        client.generate(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nested deeper" in err.value.details()


def test_min_tokens_masks_eos(demo: RunningServer) -> None:
    eos = demo_tokenizer().eos_token_id
    with Client(demo.target) as client:
        plain = client.generate(chat_request("ab", max_tokens=40), timeout=30)
        assert plain.token_ids[-1] == eos and len(plain.token_ids) < 20  # the demo model stops early
        forced = client.generate(chat_request("ab", max_tokens=40, min_tokens=20), timeout=30)
    assert len(forced.token_ids) >= 20 and eos not in forced.token_ids[:20]


@pytest.mark.parametrize("model", ["/no/such/model/dir", "not a hub id!", "some-org/some-model"])
def test_bad_model_fails_fast_with_advice(model: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ConfigError, match="demo model"):
        check_model_source(model)
    assert time.monotonic() - start < 2.0


def test_serve_with_a_bad_model_exits_before_building_the_engine(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "loraplex.backend.cli", "serve", "--model", str(tmp_path / "nope"),
                          "--port", "0", "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no such directory" in out.stderr and "engine" not in out.stderr.lower()
