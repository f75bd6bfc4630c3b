"""The project's import rules, checked on the source (AST only: nothing here imports the modules).

(a) The library (``octomed_data/``) imports neither Prefect nor Ray nor ``flows``/``tasks``/
    ``training``/``evaluation``/``cli``, not even inside a function. The command line (``cli/``,
    outside the library) imports Prefect, Ray, flows, tasks, training and evaluation only inside
    the handler that needs them, so ``octomed-data --help`` stays fast.
(b) argparse lives only in ``cli/`` (``benchmarks/`` scripts are exempt).
(c) No leading-underscore name crosses a module boundary: neither ``from m import _x`` nor
    ``import m._x`` nor ``m._x`` on a project module, anywhere in the project's packages.

``KNOWN_UNTIL_MERGE`` lists the offenders other helpers' branches are removing right now; the
lead empties it after merging. Any offender not listed fails, and so does a listed one that is
gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("octomed_data", "cli", "flows", "tasks", "training", "evaluation")
LIBRARY = "octomed_data"
CLI = "cli/"
HEAVY = {"prefect", "ray", "flows", "tasks", "training", "evaluation"}
UP = HEAVY | {"cli"}  # what the library never imports

# (rule, file, name): offenders at the time this test was written, owned by helpers whose
# branches are being merged (decontam -> octomed_data/decontam/ with its own cli module;
# training/eval -> evaluation/ and training/ CLI modules). Empty this after merging.
# Per-process entry points of a launched job (not user commands): torchrun/deepspeed start
# ``python -m training.sft --config ...`` in every rank, with launcher-added flags (--local_rank).
JOB_ENTRY_POINTS = {"training/sft.py"}
KNOWN_UNTIL_MERGE: set[tuple[str, str, str]] = set()  # emptied after the merges of this redesign


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def project_files() -> list[Path]:
    out = []
    for pkg in PACKAGES:
        base = ROOT / pkg
        if base.is_dir():
            out += sorted(p for p in base.rglob("*.py") if ".venv" not in p.parts)
    return out


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_project_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] not in PACKAGES:
        return False
    target = ROOT.joinpath(*parts)
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


class Imports(ast.NodeVisitor):
    """Every import of a file: (module, imported name or None, line, inside a function?)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.depth = 0
        self.found: list[tuple[str, str | None, int, bool]] = []
        self.module_aliases: dict[str, str] = {}  # local name -> project module it is bound to
        self.private_attrs: list[tuple[str, str, int]] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, None, node.lineno, self.depth > 0))
            if alias.asname:
                self.module_aliases[alias.asname] = alias.name
            else:
                self.module_aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = resolve(self.path, node)
        if module == "__future__":
            return
        for alias in node.names:
            self.found.append((module, alias.name, node.lineno, self.depth > 0))
            if is_project_module(f"{module}.{alias.name}"):
                self.module_aliases[alias.asname or alias.name] = f"{module}.{alias.name}"

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("tasks.ray_distill") is an import too
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (
            name == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self.found.append((node.args[0].value, None, node.lineno, self.depth > 0))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and is_private(node.attr):
            self.private_attrs.append((node.value.id, node.attr, node.lineno))
        self.generic_visit(node)


def scan(path: Path) -> Imports:
    visitor = Imports(path)
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return visitor


def offenders() -> dict[tuple[str, str, str], list[str]]:
    """(rule, file, name) -> where, for every rule."""
    out: dict[tuple[str, str, str], list[str]] = {}

    def add(rule: str, path: Path, name: str, line: int, what: str) -> None:
        out.setdefault((rule, rel(path), name), []).append(f"{rel(path)}:{line}: {what}")

    for path in project_files():
        r = rel(path)
        v = scan(path)
        own = module_name(path)
        for module, name, line, in_function in v.found:
            top = module.split(".")[0]
            # (a) the library never imports the orchestration, training or command-line layers; the
            # command line imports the heavy ones only inside a handler
            if r.startswith(f"{LIBRARY}/") and top in UP:
                kind = "heavy" if in_function else "heavy-module-level"
                add(kind, path, top, line, f"the library imports {module}")
            elif r.startswith(CLI) and top in HEAVY and not in_function:
                add("heavy-module-level", path, top, line, f"module-level import of {module} in the CLI")
            # (b) argparse only in the CLI package
            if top == "argparse" and not r.startswith(CLI) and r not in JOB_ENTRY_POINTS:
                add("argparse", path, "argparse", line, "imports argparse")
            # (c) no private names across modules
            if module != own:
                private_parts = [p for p in module.split(".") if is_private(p)]
                if private_parts:
                    add("private", path, module, line, f"imports private module {module}")
                if name is not None and is_private(name):
                    add("private", path, f"{module}.{name}", line, f"imports {name} from {module}")
        for local, attr, line in v.private_attrs:
            target = v.module_aliases.get(local)
            if target and target != own and is_project_module(target):
                add("private", path, f"{target}.{attr}", line, f"uses {target}.{attr}")
    return out


def test_no_new_offenders() -> None:
    found = offenders()
    new = {k: v for k, v in found.items() if k not in KNOWN_UNTIL_MERGE}
    assert not new, "import rules broken:\n" + "\n".join(w for where in new.values() for w in where)


def test_known_offenders_are_still_there() -> None:
    """Keeps KNOWN_UNTIL_MERGE honest: an entry whose offence is gone must be deleted."""
    gone = KNOWN_UNTIL_MERGE - set(offenders())
    assert not gone, f"fixed, remove from KNOWN_UNTIL_MERGE: {sorted(gone)}"


def test_the_scanner_sees_each_kind_of_offence(tmp_path: Path, monkeypatch) -> None:
    """A new offender of each rule is caught (so the test cannot pass by seeing nothing)."""
    lib = tmp_path / "octomed_data"
    lib.mkdir()
    (tmp_path / "cli").mkdir()
    (tmp_path / "flows").mkdir()
    (lib / "__init__.py").write_text("")
    (lib / "helper.py").write_text("def _hidden():\n    pass\n\ndef g():\n    import cli\n")
    (tmp_path / "cli" / "__init__.py").write_text("import argparse\n\ndef f():\n    import prefect\n")
    (tmp_path / "cli" / "eager.py").write_text("import ray\n")
    (lib / "bad.py").write_text(
        "import ray\n"
        "import argparse\n"
        "from octomed_data import helper\n"
        "from octomed_data.helper import _hidden\n"
        "\n"
        "def f():\n"
        "    from flows.common import RunParams\n"
        "    helper._hidden()\n"
        "    import importlib\n"
        "    importlib.import_module('tasks.ray_distill')\n"
    )
    (tmp_path / "flows" / "__init__.py").write_text("")
    (tmp_path / "flows" / "x.py").write_text("from octomed_data.helper import _hidden as h\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = set(offenders())
    assert found == {
        ("heavy-module-level", "octomed_data/bad.py", "ray"),
        ("argparse", "octomed_data/bad.py", "argparse"),
        ("private", "octomed_data/bad.py", "octomed_data.helper._hidden"),
        ("heavy", "octomed_data/bad.py", "flows"),
        ("heavy", "octomed_data/bad.py", "tasks"),
        ("private", "flows/x.py", "octomed_data.helper._hidden"),
        ("heavy", "octomed_data/helper.py", "cli"),
        ("heavy-module-level", "cli/eager.py", "ray"),
    }


MAX_LINES = 500  # issue 23: files with one job each


def long_files(root: Path) -> list[str]:
    """``path: lines`` of every non-test Python file (packages and benchmarks) over MAX_LINES."""
    out = []
    for folder in (*PACKAGES, "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > MAX_LINES:
                out.append(f"{path.relative_to(root)}: {n}")
    return out


def test_no_non_test_file_is_over_500_lines(tmp_path: Path) -> None:
    assert long_files(ROOT) == []
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "big.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_files(tmp_path) == [f"flows/big.py: {MAX_LINES + 1}"]
