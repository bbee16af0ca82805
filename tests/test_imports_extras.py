"""A client-only install (no extra): the client commands work, and what needs an extra says which
one to install instead of a raw ModuleNotFoundError. Each case runs in a child process where
the extra's modules cannot be imported, as where they are not installed."""

from __future__ import annotations

import pytest

from loraplex.extras import EXTRA_MODULES, MissingExtraError, missing_extra
from tests.helpers import run_without

NO_EXTRAS = EXTRA_MODULES["server"] | EXTRA_MODULES["gateway"]


def run_cli(blocked: frozenset[str], *argv: str) -> tuple[int, str]:
    """``loraplex ARGV`` as the console command runs it (``python -m loraplex``)."""
    code = f"import runpy, sys\nsys.argv = ['loraplex', *{list(argv)!r}]\nrunpy.run_module('loraplex', run_name='__main__')\n"
    result = run_without(blocked, code)
    return result.returncode, result.stderr


@pytest.mark.parametrize(("argv", "extra"), [(["serve", "--port", "0"], "server"),
                                             (["gateway", "--backend", "127.0.0.1:1", "--port", "0"], "gateway")])
def test_a_command_without_its_extra_names_the_pip_install(argv: list[str], extra: str) -> None:
    code, err = run_cli(NO_EXTRAS, *argv)
    assert code == 2, err
    assert f"pip install 'loraplex[{extra}]'" in err, err
    assert "Traceback" not in err, err


def test_serve_names_the_server_extra_when_only_prometheus_is_missing() -> None:
    code, err = run_cli(frozenset({"prometheus_client"}), "serve", "--port", "0")
    assert code == 2 and "pip install 'loraplex[server]'" in err and "prometheus_client" in err, err


def test_client_commands_work_without_any_extra() -> None:
    code, err = run_cli(NO_EXTRAS, "info", "--target", "127.0.0.1:9", "--timeout", "2")
    assert code == 1 and err.startswith("error: UNAVAILABLE"), err  # nothing listens there: a clean gRPC error
    code, err = run_cli(NO_EXTRAS, "gateway", "--help")
    assert code == 0, err


def test_offline_llm_without_torch_names_the_server_extra() -> None:
    code = ("try:\n    from loraplex import LLM\nexcept ModuleNotFoundError as exc:\n"
            "    print(type(exc).__name__, exc)\nelse:\n    raise SystemExit('imported')\n")
    result = run_without({"torch"}, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("MissingExtraError loraplex.LLM needs the 'server' extra"), result.stdout
    assert "pip install 'loraplex[server]'" in result.stdout


def test_a_missing_module_of_no_extra_is_not_blamed_on_an_extra() -> None:
    unrelated = ModuleNotFoundError("No module named 'loraplex.backend.nope'", name="loraplex.backend.nope")
    assert missing_extra(unrelated, "server", "x") is None
    torch_missing = ModuleNotFoundError("No module named 'torch'", name="torch")
    error = missing_extra(torch_missing, "server", "x")
    assert isinstance(error, MissingExtraError) and isinstance(error, ModuleNotFoundError)
    assert missing_extra(torch_missing, "gateway", "x") is None
