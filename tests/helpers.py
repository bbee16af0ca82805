"""Small helpers shared by every test folder: polling, Prometheus scrapes, the CLI command, a
Python child process in which some third-party modules are "not installed", and the API-key
comparison guards."""

from __future__ import annotations

import hmac
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable


def wait_until(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of the first ``name`` series in a /metrics scrape whose labels include ``labels``
    (0 when absent)."""
    want = set(_label_pairs(labels))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        base, _, rest = series.partition("{")
        if base == name and want <= set(_label_pairs(rest)):
            return float(value)
    return 0.0


def _label_pairs(text: str) -> list[tuple[str, str]]:
    return re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', text)


def loraplex_command() -> list[str]:
    """The ``loraplex`` console script when installed (as a user types it), else the module."""
    script = shutil.which("loraplex")
    return [script] if script else [sys.executable, "-m", "loraplex"]


# Run first in the child: an import of a blocked module (or a submodule of it) fails exactly as
# it does where the distribution is not installed.
_BLOCKER = """
import importlib.abc, sys
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def run_without(modules: Iterable[str], code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -c code`` in a child process where ``modules`` cannot be imported."""
    prelude = f"BLOCKED = {sorted(modules)!r}\n{_BLOCKER}\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout)


class GuardedKey(str):
    """A key that fails the test when anything compares it with ``==`` or ``!=`` (which stop at the
    first differing character) instead of ``hmac.compare_digest``."""

    def __eq__(self, other: object) -> bool:
        raise AssertionError("the API key was compared with ==")

    def __ne__(self, other: object) -> bool:
        raise AssertionError("the API key was compared with !=")

    __hash__ = str.__hash__


class DigestSpy:
    """Stands in for ``hmac.compare_digest`` (and calls it), remembering its arguments."""

    def __init__(self) -> None:
        self.real = hmac.compare_digest
        self.calls: list[tuple[object, object]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((a, b))
        return self.real(a, b)
