"""Every path is named once, in ``octomed_data/layout.py``: no ``storage.join(..., "literal")`` elsewhere.

The scan reads the source (AST): a ``storage.join`` call with a string or f-string argument outside
layout.py is an offender (reported as file::function and lines).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("octomed_data", "cli", "flows", "tasks", "training", "evaluation")
LAYOUT = "octomed_data/layout.py"
# The storage layer names its own dataset files (``part-<shard>.parquet``, ``_manifest/``): below the layout.
STORAGE = "octomed_data/storage"
# Offenders waiting for their owner (file::function): the list may only shrink. A new offender fails,
# and so does a listed one that is gone (then delete it here).
KNOWN: set[str] = set()


def _is_storage_join(node: ast.Call, joins: set[str]) -> bool:
    """``storage.join(...)``, or ``join(...)`` where the module imported ``join`` from the storage layer."""
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in joins
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "join"
        and isinstance(func.value, ast.Name)
        and func.value.id == "storage"
    )


def _storage_joins(tree: ast.AST) -> set[str]:
    """Names a module binds to the storage layer's ``join`` (``from octomed_data.storage import join``)."""
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("octomed_data.storage")
        for alias in node.names
        if alias.name == "join"
    }


def _literal(arg: ast.expr) -> bool:
    return isinstance(arg, ast.JoinedStr) or (isinstance(arg, ast.Constant) and isinstance(arg.value, str))


def offenders() -> dict[str, list[int]]:
    """``file::function`` -> lines of its literal ``storage.join`` calls."""
    found: dict[str, list[int]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == LAYOUT or rel.startswith(STORAGE + "/"):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
            _scan(tree, rel, [], found, _storage_joins(tree))
    return found


def _scan(node: ast.AST, rel: str, scope: list[str], found: dict[str, list[int]], joins: set[str]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            _scan(child, rel, [*scope, child.name], found, joins)
            continue
        if isinstance(child, ast.Call) and _is_storage_join(child, joins) and any(map(_literal, child.args)):
            found.setdefault(f"{rel}::{'.'.join(scope) or '<module>'}", []).append(child.lineno)
        _scan(child, rel, scope, found, joins)


def test_scan_finds_a_literal_path(tmp_path: Path) -> None:
    source = (
        'def f(out):\n    return storage.join(out, "x.json")\n'
        "def g(p):\n    return p.summary\n"
        "class C:\n    def h(self, m):\n        from octomed_data.storage import join as j\n"
        '        return j(m, f"eval-{m}")\n'
    )
    tree = ast.parse(source)
    found: dict[str, list[int]] = {}
    _scan(tree, "m.py", [], found, _storage_joins(tree))
    assert found == {"m.py::f": [2], "m.py::C.h": [8]}


def test_no_literal_path_outside_layout() -> None:
    new = {k: v for k, v in offenders().items() if k not in KNOWN}
    assert not new, (
        "literal storage.join paths outside octomed_data/layout.py (name them in layout.py): "
        + "; ".join(f"{k} (lines {v})" for k, v in sorted(new.items()))
    )


def test_known_offenders_only_shrink() -> None:
    gone = sorted(KNOWN - set(offenders()))
    assert not gone, f"no longer offenders, delete them from KNOWN in {__file__}: {gone}"
