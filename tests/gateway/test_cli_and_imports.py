"""The CLI's flags and environment and the config's checks (import rules: tests/test_architecture.py)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from pathlib import Path

import openai
import pytest
from e2e_stack import wait_healthy
from gateway_harness import GatewayHarness, free_port

from loraplex.errors import ConfigError
from loraplex.gateway import cli
from loraplex.gateway.config import GatewayConfig
from tests.helpers import loraplex_command


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    config = cli.config_from_args(parse())
    assert (config.static_backends(), config.host, config.port) == (["127.0.0.1:50051"], "127.0.0.1", 8000)
    assert config.api_key is None and config.cors_origins == [] and config.reasoning_parser == "think"


def test_flags(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"PEM")
    config = cli.config_from_args(parse(
        "--backend", "b:1", "--host", "0.0.0.0", "--port", "9", "--api-key", "k", "--backend-token", "t",
        "--backend-ca", str(ca), "--cors-origins", "https://a, https://b", "--max-request-bytes", "2048",
        "--reasoning-parser", "none", "--tool-parser", "none", "--served-model-name", "base",
        "--request-timeout", "3"))
    assert (config.backend, config.port, config.api_key, config.backend_token) == (["b:1"], 9, "k", "t")
    assert config.tls().root_certificates == b"PEM" and config.cors_origins == ["https://a", "https://b"]
    assert (config.max_request_bytes, config.reasoning_parser, config.tool_parser) == (2048, "none", "none")
    assert (config.served_model_name, config.request_timeout) == ("base", 3.0)


def test_secrets_from_the_environment_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse()
    monkeypatch.setenv("LORAPLEX_API_KEY", "from-env")
    monkeypatch.setenv("LORAPLEX_BACKEND_TOKEN", "tok")
    config = cli.config_from_args(args)
    assert (config.api_key, config.backend_token) == ("from-env", "tok")
    assert cli.config_from_args(parse("--api-key", "flag")).api_key == "flag"


@pytest.mark.parametrize("kwargs", [{"backend": ["nocolon"]}, {"port": 70000}, {"max_request_bytes": 10},
                                    {"reasoning_parser": "deepseek"}, {"tool_parser": "mistral"},
                                    {"request_timeout": 0}, {"backend_cert": "x.pem"}, {"max_choices": 0},
                                    {"backend_reconnect_seconds": 0}])
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        GatewayConfig(**kwargs)  # type: ignore[arg-type]


def test_run_reports_a_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(parse("--backend", "nocolon")) == 2
    assert "backend" in capsys.readouterr().err
    assert cli.run(parse("--backend-ca", "/does/not/exist.pem")) == 2


def test_the_command_serves_and_stops_cleanly_on_sigterm(gw: GatewayHarness, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*loraplex_command(), "gateway", "--backend", gw.config.backend[0], "--host",
                                 "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "LORAPLEX_API_KEY": "k"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert client.completions.create(model="reverse", prompt="abc").choices[0].text == "cba"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="no", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
