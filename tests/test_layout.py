"""The layout the README's "Layout" section describes holds: no import circle among cvmfsd's
modules, the mount core never reaches into the admin surface or the process around it, and the
cvmfs2 stand-in is a package of its own that only the demo uses. Read from the source with ast:
every import counts, also one inside a function or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGES = ("cvmfsd", "cvmfs2_standin")


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES it imports (a name imported from a package counts as
    its submodule where there is one, else as the package)."""
    files = {_module(p): p for pkg in PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        edges = graph.setdefault(mod, set())
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t.split(".")[0] in PACKAGES and t != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    graph = _graph()
    assert "cvmfsd.core.mounter" in graph and "cvmfsd.admin.service" in graph
    assert _cycles(graph) == []


def test_each_part_imports_only_what_it_stands_on() -> None:
    """core: itself and the process's shared modules; admin: core too; the stand-in: nothing
    of cvmfsd; the stand-in is used by the demo only (tests and bench use it from outside)."""
    shared = {"cvmfsd", "cvmfsd.config", "cvmfsd.log", "cvmfsd.signals", "cvmfsd.lazy"}
    wrong = []
    for mod, targets in _graph().items():
        for t in targets:
            if mod.startswith("cvmfsd.core"):
                ok = t.startswith("cvmfsd.core") or t in shared
            elif mod.startswith("cvmfsd.admin"):
                ok = t.startswith(("cvmfsd.core", "cvmfsd.admin")) or t in shared
            elif mod.startswith("cvmfs2_standin"):
                ok = t.startswith("cvmfs2_standin")
            else:
                ok = not t.startswith("cvmfs2_standin") or mod == "cvmfsd.demo"
            if not ok:
                wrong.append(f"{mod} -> {t}")
    assert wrong == []
