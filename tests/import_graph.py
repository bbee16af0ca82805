"""loraplex's import graph read from the SOURCE with ``ast`` (nothing is imported), so the
package-graph rules of DESIGN.md can be checked without torch and without running any code."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("backend", "lora", "kernels", "gateway", "clients")  # as setup.py maps them
GENERATED = ("loraplex.clients.v1",)  # protoc output: imports only protobuf and grpc


@dataclass
class Module:
    name: str  # "loraplex.backend.engine.scheduler"
    path: Path
    eager: set[str] = field(default_factory=set)  # imported when the module is imported
    lazy: set[str] = field(default_factory=set)  # imported inside functions or under TYPE_CHECKING

    @property
    def imports(self) -> set[str]:
        return self.eager | self.lazy

    @property
    def package(self) -> str:
        """``backend``, ``lora``, ... or, for the root modules, ``config``, ``errors``, ``loraplex``."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else "loraplex"


def module_files() -> dict[str, Path]:
    files = {_name("loraplex", p.relative_to(ROOT / "loraplex_pkg")): p for p in (ROOT / "loraplex_pkg").glob("*.py")}
    for folder in FOLDERS:
        for p in (ROOT / folder).rglob("*.py"):
            files[_name(f"loraplex.{folder}", p.relative_to(ROOT / folder))] = p
    return files


def _name(prefix: str, rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([prefix, *parts])


def build_graph() -> dict[str, Module]:
    files = module_files()
    graph = {name: Module(name, path) for name, path in files.items()}
    for module in graph.values():
        _collect(module, ast.parse(module.path.read_text()), set(files))
    return graph


def _collect(module: Module, tree: ast.Module, known: set[str]) -> None:
    is_package = module.path.name == "__init__.py"
    base = module.name if is_package else module.name.rpartition(".")[0]

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) or _is_type_checking(child)
            if isinstance(child, ast.Import | ast.ImportFrom):
                (module.lazy if lazy else module.eager).update(_targets(child, base, known))
            visit(child, inner)

    visit(tree, False)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _targets(node: ast.Import | ast.ImportFrom, base: str, known: set[str]) -> set[str]:
    """Fully qualified names imported: ``from a import b`` is ``a.b`` when that is a module."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:
        anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
        source = f"{anchor}.{node.module}" if node.module else anchor
    else:
        source = node.module or ""
    return {f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names}


def top(name: str) -> str:
    return name.split(".")[0]


def loraplex_deps(graph: dict[str, Module], name: str, eager_only: bool) -> set[str]:
    """The loraplex modules ``name`` imports, each with the packages above it (their __init__ runs)."""
    found = set()
    for target in graph[name].eager if eager_only else graph[name].imports:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) in graph:
                found.add(".".join(parts[:i]))
    return found - {name}


def closure(graph: dict[str, Module], start: set[str]) -> set[str]:
    """Every loraplex module that importing ``start`` executes (imports at module level only)."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(loraplex_deps(graph, name, eager_only=True))
    return seen


def package_edges(graph: dict[str, Module]) -> dict[str, set[str]]:
    """Package -> the other packages its modules import (lazily or not)."""
    edges: dict[str, set[str]] = {}
    for module in graph.values():
        for dep in loraplex_deps(graph, module.name, eager_only=False):
            if graph[dep].package != module.package and dep != "loraplex":
                edges.setdefault(module.package, set()).add(graph[dep].package)
    return edges


def find_cycle(edges: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One cycle among ``nodes`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def dfs(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, set()) & nodes):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (cycle := dfs(node, [node])):
            return cycle
    return None
