"""No import cycles among shoal's modules: the graph is built from the source with ``ast``.

What counts as an edge ``a -> b`` (module ``a`` imports shoal module ``b``):

- every ``import shoal.x.y`` / ``from shoal.x import y`` / relative ``from .y import z``, at module
  level **and inside functions or methods**: a late import inside a function is the usual way a cycle
  is hidden rather than broken, and it still runs (and can still meet a half-initialised module) the
  first time the function is called;
- ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` itself;
- the parents a dotted import initialises on the way (``shoal.workers`` for ``shoal.workers.x``) are
  not edges: a package's ``__init__`` is already in ``sys.modules`` while its submodules load, so
  importing it back cannot meet a half-built module the way a real cycle does.

What does not: imports under ``if TYPE_CHECKING:``. They never run, so they cannot make an import order
fail; they exist so that annotations may name a type from a module that may not be imported at run
time (the router names ``AsyncEngine`` without pulling in torch). A cycle through them is a cycle in
names only, not in loading.

The package map comes from ``pyproject.toml`` (``package-dir``: ``router/`` is ``shoal.router``).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in cfg["package-dir"].items()}


def discover_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under the mapped folders."""
    modules: dict[str, Path] = {}
    for prefix, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the `else:` branch does run
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    base = package.split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The shoal modules ``module`` imports (edges as the docstring above defines them)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in modules:  # `import shoal.x.y.Name`-style tails are not modules
            name = name.rpartition(".")[0]
        if name.startswith("shoal") and name != module:
            found.add(name)

    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        else:
            base = _resolve_from(module, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = discover_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (``[a, b, ..., a]``) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan's algorithm; the graph is a few hundred nodes
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(comp, graph) for comp in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"component {component} has no cycle through {start}")


def test_the_graph_sees_the_packages_and_their_imports():
    # A graph that found nothing would pass the cycle test vacuously: check it sees known edges.
    graph = import_graph()
    assert {"shoal.router.app", "shoal.cluster.cli", "shoal.workers.server", "shoal.kernels"} <= set(graph)
    assert "shoal.workers.protocol" in graph["shoal.workers.rpc.codec"]  # relative, from .. import
    assert "shoal.workers.llm_engine" in graph["shoal.workers.server"]  # inside a function


def test_find_cycles_names_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_type_checking_imports_are_not_edges(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from shoal.b import B\nelse:\n    import shoal.c\n"
                   "def f():\n    from .d import x\n")
    modules = {"shoal.a": src, "shoal.b": src, "shoal.c": src, "shoal.d": src}
    assert imports_of("shoal.a", src, modules) == {"shoal.c", "shoal.d"}


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among shoal's modules:\n" + "\n".join(" -> ".join(c) for c in cycles)
