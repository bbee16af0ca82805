"""The package-graph rules of DESIGN.md, checked on the source (tests/import_graph.py) and, for
the torch-free parts, by importing them in a child process where torch cannot be imported."""

from __future__ import annotations

import pytest

from tests.helpers import run_without
from tests.import_graph import build_graph, closure, find_cycle, package_edges, top

GRAPH = build_graph()
PACKAGES = {"backend", "lora", "kernels", "clients", "gateway"}
ENGINE = ("loraplex.backend.engine", "loraplex.backend.models", "loraplex.backend.layers")
PURE_PYTHON = ("loraplex.backend.engine.scheduler", "loraplex.backend.engine.kv_cache",
               "loraplex.backend.engine.sequence")
TORCH_LIKE = ("torch", "transformers", "triton", "safetensors")  # what a client-only install lacks


def modules_of(*prefixes: str) -> list[str]:
    return sorted(n for n in GRAPH if n.startswith(prefixes) and not n.startswith("loraplex.clients.v1"))


def external_imports(names: list[str] | set[str]) -> dict[str, set[str]]:
    return {n: {top(i) for i in GRAPH[n].imports if top(i) != "loraplex"} for n in names}


def loraplex_imports(name: str) -> set[str]:
    return {i for i in GRAPH[name].imports if top(i) == "loraplex"}


def test_the_graph_sees_every_package() -> None:
    assert {GRAPH[n].package for n in GRAPH} >= PACKAGES | {"config", "errors"}
    assert "loraplex.backend.engine.scheduler" in GRAPH and "loraplex.lora.registry" in GRAPH


def test_no_cycle_among_the_packages() -> None:
    edges = package_edges(GRAPH)
    assert find_cycle(edges, PACKAGES) is None, f"package cycle: {find_cycle(edges, PACKAGES)}"
    # and the two dependency directions DESIGN.md fixes
    assert "backend" not in edges.get("lora", set()), "lora imports backend"
    assert not edges.get("kernels", set()), f"kernels imports {edges['kernels']}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}, {"a", "b", "c"}) is None


@pytest.mark.parametrize("name", ["loraplex.config", "loraplex.errors"])
def test_root_config_and_errors_import_only_each_other(name: str) -> None:
    assert loraplex_imports(name) <= {"loraplex.config", "loraplex.errors"}, loraplex_imports(name)
    assert not external_imports([name])[name] & {*TORCH_LIKE, "grpc", "google"}


def test_kernels_import_nothing_of_loraplex() -> None:
    outside = {n: {i for i in loraplex_imports(n) if not i.startswith("loraplex.kernels")}
               for n in modules_of("loraplex.kernels")}
    offenders = {n: s for n, s in outside.items() if s}
    assert not offenders, offenders


def test_scheduler_kv_cache_and_sequence_import_no_torch() -> None:
    executed = closure(GRAPH, set(PURE_PYTHON))
    offenders = {n: s for n, s in external_imports(executed).items() if s & {"torch", "numpy", "triton"}}
    assert not offenders, f"the pure-Python engine core pulls in torch through {offenders}"


def test_the_engine_imports_no_protobuf_or_grpc() -> None:
    names = modules_of(*ENGINE)
    assert names, "no engine module found"
    offenders = {n: s & {"grpc", "google", "grpc_health", "grpc_reflection"}
                 for n, s in external_imports(closure(GRAPH, set(names))).items()}
    offenders = {n: s for n, s in offenders.items() if s}
    assert not offenders, f"protobuf/gRPC reached from the engine: {offenders}"
    reached = {n for n in closure(GRAPH, set(names)) if n.startswith(("loraplex.clients", "loraplex.backend.server"))}
    assert not reached, f"the engine imports the gRPC edge: {reached}"


@pytest.mark.parametrize("package", ["loraplex.clients", "loraplex.gateway"])
def test_clients_and_gateway_import_no_torch_and_no_engine(package: str) -> None:
    names = modules_of(package)
    torch_users = {n: s & set(TORCH_LIKE) for n, s in external_imports(names).items() if s & set(TORCH_LIKE)}
    assert not torch_users, torch_users
    engine_users = {n: {i for i in loraplex_imports(n) if i.startswith(("loraplex.backend", "loraplex.lora",
                                                                         "loraplex.kernels"))} for n in names}
    assert not any(engine_users.values()), engine_users


def test_torch_free_modules_import_without_torch() -> None:
    """The same rules at run time, in a process where torch & co cannot be imported: the client
    and gateway modules load no engine module, and the rest of the torch-free set imports."""
    front = ["loraplex.clients", "loraplex.clients.aio", "loraplex.clients.client", "loraplex.gateway.app",
             "loraplex.gateway.cli", "loraplex.config", "loraplex.errors"]
    code = ("import importlib, sys\n"
            f"for name in {front!r}: importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('loraplex.backend', 'loraplex.lora', "
            "'loraplex.kernels')))\n"
            "if bad: sys.exit(f'the client/gateway imports pulled in {bad}')\n"
            f"for name in {[*PURE_PYTHON, 'loraplex.backend.cli']!r}: importlib.import_module(name)\n")
    result = run_without(TORCH_LIKE, code)
    assert result.returncode == 0, result.stderr[-3000:]
