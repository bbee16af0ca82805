"""The ``loraplex`` command's entry (``python -m loraplex``) and one casing of --log-level for
``serve`` and ``gateway`` (both accept any casing; help shows lower case)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from loraplex import __version__
from loraplex.backend import cli
from loraplex.gateway import cli as gateway_cli


def test_module_entry_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "loraplex", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"loraplex {__version__}", out.stderr


@pytest.mark.parametrize("given", ["INFO", "info", "Info"])
def test_log_level_takes_any_casing_in_serve_and_gateway(given: str) -> None:
    assert cli.build_parser().parse_args(["serve", "--log-level", given]).log_level == "info"
    parser = argparse.ArgumentParser()
    gateway_cli.add_arguments(parser)
    assert parser.parse_args(["--log-level", given]).log_level == "info"


def test_log_level_choices_are_lower_case_in_both_helps(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "{debug,info,warning,error}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["gateway", "--help"])
    assert "info,debug}" in capsys.readouterr().out
