"""Issue 11 over real servers: safe defaults, sources that do not tell what exists, pickle behind a
safetensors name, overflowing adapters, tiny temperatures, deep JSON, min_tokens and EOS, a bad --model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

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
            for source in ("/etc", str(tmp_path / "missing"), "/proc/self/root/etc", "org/name"):
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


@pytest.mark.parametrize("top_k", [0, 1])
def test_a_tiny_temperature_is_greedy_over_grpc(demo: RunningServer, top_k: int) -> None:
    """Issue 11.4 as it showed: temperature 1e-40 (a float32 denormal on the wire) gave random text."""
    with Client(demo.target) as client:
        for text, adapter in (("Hello world", ""), ("Tiny temperature", "reverse"), ("abc", "upper")):
            greedy = client.generate(chat_request(text, adapter, max_tokens=32, ignore_eos=True), timeout=30)
            tiny = client.generate(chat_request(text, adapter, max_tokens=32, ignore_eos=True, temperature=1e-40,
                                                top_k=top_k), timeout=30)
            assert tiny.token_ids == greedy.token_ids, (text, adapter)


def copy_demo_adapter(name: str, to: Path) -> Path:
    shutil.copytree(DEMO_ADAPTERS[name], to)  # under the temp dir: inside the test servers' roots
    return to


def refused(client: Client, name: str, source: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        client.load_adapter(name, source, timeout=60)
    return err.value


def test_pickle_behind_a_safetensors_name_is_refused_unread_over_grpc(demo: RunningServer, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11.3 as it showed: ``adapter_model.safetensors -> w.bin`` (a torch.save file) loaded with
    pickle off. The server shares this process, so a spy on torch.load sees whether it was reached."""
    path = copy_demo_adapter("upper", tmp_path / "pickled")
    weights = path / "adapter_model.safetensors"
    torch.save(load_file(weights), path / "w.bin")
    weights.unlink()
    weights.symlink_to("w.bin")
    loads: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    with Client(demo.target) as client:
        err = refused(client, "pickled", str(path))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a safetensors file" in err.details()
        assert loads == [] and "pickled" not in {a.name for a in client.list_adapters(timeout=10)}


def test_adapters_whose_values_overflow_are_refused_over_grpc(demo: RunningServer, tmp_path: Path) -> None:
    """Issue 11.10 as it showed: ``lora_alpha: 1e38`` or weights of 1e30 loaded, then emitted NULs."""
    alpha = copy_demo_adapter("upper", tmp_path / "alpha")
    config = json.loads((alpha / "adapter_config.json").read_text())
    (alpha / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e38}))
    huge = copy_demo_adapter("upper", tmp_path / "huge")
    save_file({k: v * 1e30 for k, v in load_file(huge / "adapter_model.safetensors").items()},
              str(huge / "adapter_model.safetensors"))
    with Client(demo.target) as client:
        for name, path in (("alpha", alpha), ("huge", huge)):
            err = refused(client, name, str(path))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "overflow" in err.details(), name
        assert not {"alpha", "huge"} & {a.name for a in client.list_adapters(timeout=10)}
        assert client.generate(chat_request("Still right", "upper"), timeout=30).text == \
            expected_output("upper", "Still right")


def test_a_refused_source_does_not_tell_whether_it_exists_over_grpc(demo: RunningServer, tmp_path: Path) -> None:
    """Issue 11.2: outside the roots, an existing directory and a missing one get the same answer."""
    # /etc exists everywhere and is outside the test servers' roots (the temp dir, where CI's venv lives)
    assert Path("/etc").is_dir()
    outside = ["/etc", "/no/such/dir", "/proc/self/root/etc", "/proc/self/root/no/such/dir",
               f"{tmp_path}/{'../' * len(tmp_path.parts)}etc"]
    with Client(demo.target) as client:
        answers = set()
        for source in outside:
            err = refused(client, "x", source)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, source
            answers.add(err.details().replace(source, "<source>"))
    assert len(answers) == 1, answers
