"""CLI flags come from the typed config; the CLI imports no torch; tokens resolve at run time."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from loraplex.backend import cli, cli_args
from loraplex.backend.server.config import ServerConfig
from loraplex.config import EngineConfig
from loraplex.errors import ConfigError


def serve_args(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_every_config_field_has_a_documented_flag() -> None:
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    sections = [EngineConfig.__dataclass_fields__[s].default_factory for s in cli_args.ENGINE_SECTIONS]
    names = [f.name for cls in [*sections, ServerConfig] for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    names.append("stuck_step_seconds")
    for name in names:
        assert f"--{name.replace('_', '-')}" in help_text, name
    assert "--lora NAME=SOURCE" in help_text and "--api-key-file" in help_text


def test_flags_build_validated_configs() -> None:
    args = serve_args("--model", "/m", "--max-num-seqs", "8", "--lora", "a=/x", "--lora", "b=/y",
                      "--no-enable-prefix-caching", "--metrics-port", "none", "--port", "0", "--grace-period", "2",
                      "--max-waiting-requests", "4", "--adapter-roots", "/r1", "--adapter-roots", "/r2")
    ec = cli_args.engine_config_from_args(args)
    assert ec.model.model == "/m" and ec.scheduler.max_num_seqs == 8 and ec.scheduler.max_waiting_requests == 4
    assert ec.lora.preload == ["a=/x", "b=/y"] and ec.lora.adapter_roots == ["/r1", "/r2"]
    assert ec.cache.enable_prefix_caching is False and ec.cache.block_size == 16
    sc = cli_args.server_config_from_args(args, environ={})
    assert (sc.port, sc.metrics_port, sc.grace_period, sc.api_key) == (0, None, 2.0, None)


def test_bad_values_are_named() -> None:
    with pytest.raises(ConfigError, match="max_num_seqs=0"):
        cli_args.engine_config_from_args(serve_args("--max-num-seqs", "0"))
    with pytest.raises(SystemExit):
        serve_args("--lora", "no-equals-sign")
    with pytest.raises(ConfigError, match="tls_cert_file"):
        cli_args.server_config_from_args(serve_args("--tls-cert-file", "/c.pem"), environ={})


def test_api_key_sources(tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env = {cli_args.API_KEY_ENV: "from-env"}
    assert cli_args.server_config_from_args(serve_args("--api-key", "flag"), environ=env).api_key == "flag"
    args = serve_args("--api-key-file", str(key_file))
    assert cli_args.server_config_from_args(args, environ=env).api_key == "from-file"
    assert cli_args.server_config_from_args(serve_args(), environ=env).api_key == "from-env"
    with pytest.raises(ConfigError, match="api_key_file"):
        cli_args.resolve_api_key(None, str(tmp_path / "missing"), {})


def test_generate_request_from_flags() -> None:
    args = cli.build_parser().parse_args(["generate", "--chat", "--system", "be brief", "--adapter", "upper",
                                          "--max-tokens", "5", "--temperature", "0", "--stop", "x", "hello"])
    req = cli.generate_request(args)
    assert req.adapter == "upper" and [m.role for m in req.chat.messages] == ["system", "user"]
    assert req.params.max_tokens == 5 and req.params.HasField("temperature") and req.params.temperature == 0
    assert not req.params.HasField("top_p") and list(req.params.stop) == ["x"]
    plain = cli.generate_request(cli.build_parser().parse_args(["generate", "hi"]))
    assert plain.prompt == "hi" and not plain.params.HasField("max_tokens")


def test_cli_import_pulls_no_torch() -> None:
    code = ("import sys, loraplex.backend.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_help_runs_for_every_command() -> None:
    for argv in (["--help"], ["serve", "--help"], ["generate", "--help"], ["adapters", "load", "--help"],
                 ["adapters", "list", "--help"], ["info", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
