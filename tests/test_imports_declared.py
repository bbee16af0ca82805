"""Every third-party module the code imports comes from a dependency that pyproject.toml
declares, in the extra that installs that part: the client needs only the base dependencies,
the gateway [gateway], the engine and server [server] (+ [gpu] for triton), the tests [test].
So a fresh virtualenv with the README's install has everything, and a client-only install
imports nothing it lacks (issue 12.1: a test imported `cryptography`, which no extra installed)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from loraplex.extras import EXTRA_MODULES

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ALL = ("server", "gpu", "gateway", "test")
# folder (or file) -> the extras its imports may come from, besides the base dependencies
ALLOWED: dict[str, tuple[str, ...]] = {
    "clients": (), "clients/codegen.py": ("test",),  # codegen runs grpc_tools, a developer tool
    "clients/bench": ("bench",),  # `loraplex bench serve`: httpx and matplotlib from the bench extra
    "gateway": ("gateway",),
    "backend": ("server", "gpu"), "lora": ("server",), "kernels": ("server", "gpu"), "loraplex_pkg": ("server",),
    "tests": ALL, "scripts": ALL, "bench": ALL, "setup.py": ("build",),
}
BUILD_REQUIRES = ("setuptools",)


def _dist(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared(extras: tuple[str, ...]) -> set[str]:
    reqs = list(PYPROJECT["dependencies"])
    for extra in extras:
        reqs += BUILD_REQUIRES if extra == "build" else PYPROJECT["optional-dependencies"][extra]
    return {_dist(r) for r in reqs}


def third_party_imports(path: Path) -> set[str]:
    local = {p.stem for p in path.parent.glob("*.py")} | {"loraplex", "tests", "__future__"}
    if {"tests", "bench"} & set(path.relative_to(ROOT).parts[:1]):  # they put each other's helpers on sys.path
        local |= {p.stem for d in ("tests", "bench") for p in (ROOT / d).rglob("*.py")} | {"bench"}
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def allowed_for(rel: Path) -> tuple[str, ...]:
    """The entry of the longest folder (or the file) that holds ``rel``."""
    for n in range(len(rel.parts), 0, -1):
        key = "/".join(rel.parts[:n])
        if key in ALLOWED:
            return ALLOWED[key]
    raise KeyError(rel)


def sources() -> list[Path]:
    files = [ROOT / "setup.py"]
    for folder in ALLOWED:
        if (ROOT / folder).is_dir():
            files += (ROOT / folder).rglob("*.py")
    return [f for f in files if "clients/v1" not in f.as_posix() and "__pycache__" not in f.parts]


def test_every_import_comes_from_a_declared_dependency_of_its_extra() -> None:
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for path in sources():
        rel = path.relative_to(ROOT)
        allowed = declared(allowed_for(rel))
        for module in sorted(third_party_imports(path)):
            dists = {_dist(d) for d in distributions.get(module, [])}
            if not dists & allowed:
                missing.append(f"{rel}: imports {module} ({', '.join(sorted(dists)) or 'not installed'}), "
                               f"not declared in {['base', *allowed_for(rel)]}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("extra", sorted(EXTRA_MODULES))
def test_the_missing_extra_messages_know_each_extras_modules(extra: str) -> None:
    """loraplex.extras names an extra only for modules that extra really installs."""
    distributions = importlib.metadata.packages_distributions()
    for module in EXTRA_MODULES[extra]:
        dists = {_dist(d) for d in distributions.get(module, [])}
        assert dists & declared((extra,)), f"{module} is not installed by [{extra}]"
