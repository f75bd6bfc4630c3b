"""No import cycles between the project's modules, counting imports inside functions too.

A cycle hidden behind a function-level import (``a`` imports ``b`` at the top, ``b`` imports ``a``
inside a function) still ties two modules into one: neither can be read, tested or moved alone,
and import order decides whether they load. The check reads the source (AST only: nothing here
imports the modules), builds the graph of project-module imports (module level and inside
functions, ``import`` and ``from ... import`` including relative ones, and
``importlib.import_module("literal")``) and finds its strongly connected components (Tarjan).

``KNOWN`` lists the cycles still there in other owners' areas (or waiting for their import
switches); a cycle not listed fails, and so does a listed one that is gone (the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("octomed_data", "cli", "flows", "tasks", "training", "evaluation")

KNOWN: set[frozenset[str]] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str, root: Path) -> bool:
    parts = dotted.split(".")
    if not parts[0] or parts[0] not in PACKAGES:
        return False
    target = root.joinpath(*parts)
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every project module ``path`` imports, at module level or inside a function."""
    own = module_name(path, root)
    package = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - (node.level - 1)] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        for name in names:  # the most specific project module named: a submodule, else its package
            if is_module(name, root):
                out.add(name)
                break
    out.discard(own)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        base = root / pkg
        if base.is_dir():
            for path in sorted(base.rglob("*.py")):
                if ".venv" not in path.parts:
                    graph[module_name(path, root)] = imported_modules(path, root)
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.add(frozenset(component))
    return found


def show(found: set[frozenset[str]]) -> str:
    return "\n".join(" <-> ".join(sorted(c)) for c in sorted(found, key=sorted))


def test_no_new_import_cycles() -> None:
    new = cycles(import_graph()) - KNOWN
    assert not new, "import cycles (counting function-level imports):\n" + show(new)


def test_known_cycles_are_still_there() -> None:
    """Keeps KNOWN honest: a cycle that is gone must be deleted from it."""
    gone = KNOWN - cycles(import_graph())
    assert not gone, "fixed, remove from KNOWN:\n" + show(gone)


def test_the_check_sees_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """A synthetic project: a cycle via a function-level relative import, a three-module cycle via
    ``import_module``, and modules that only look alike (no cycle) are told apart."""
    lib = tmp_path / "octomed_data"
    (lib / "pkg").mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "pkg" / "__init__.py").write_text("")
    (lib / "a.py").write_text("from octomed_data import b\n")
    (lib / "b.py").write_text("def f():\n    from .a import thing\n")
    (lib / "pkg" / "x.py").write_text("import octomed_data.pkg.y\n")
    (lib / "pkg" / "y.py").write_text("from octomed_data.pkg.z import g\n")
    (lib / "pkg" / "z.py").write_text(
        "import importlib\n\ndef g():\n    importlib.import_module('octomed_data.pkg.x')\n"
    )
    (lib / "c.py").write_text("from octomed_data.a import thing\nimport json\n")  # c -> a, nothing back
    (lib / "d.py").write_text("'octomed_data.c'\n")  # a string is not an import
    graph = import_graph(tmp_path)
    assert graph["octomed_data.b"] == {"octomed_data.a"}
    assert cycles(graph) == {
        frozenset({"octomed_data.a", "octomed_data.b"}),
        frozenset({"octomed_data.pkg.x", "octomed_data.pkg.y", "octomed_data.pkg.z"}),
    }
    (lib / "b.py").write_text("def f():\n    import json\n")
    assert cycles(import_graph(tmp_path)) == {
        frozenset({"octomed_data.pkg.x", "octomed_data.pkg.y", "octomed_data.pkg.z"})
    }
