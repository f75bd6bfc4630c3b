"""The sandbox is one simulated teacher among any: no module outside its package checks for it by name.

Everything the factory does differently for a simulated teacher (no key, rows labelled, costs
marked simulated, the report's warning) goes through :func:`octomed_data.teachers.is_simulated`
and :func:`~octomed_data.teachers.simulated_reply`, the one place that knows the label. Checked on
the source (AST): no comparison with the literal ``"sandbox"``, no use of the sandbox package's
name constants, and no import of the sandbox package from library modules outside the places
that start it as a stand-in (the composition layers: CLI and flows).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("octomed_data", "cli", "flows", "tasks", "training", "evaluation")
OWN = ("octomed_data/sandbox/", "cli/sandbox.py", "octomed_data/teachers.py")
NAME_CONSTANTS = {"SANDBOX_TEACHER", "SANDBOX_FINGERPRINT"}
# Where a stand-in is started (composition, not judgement): the CLI and the flows.
MAY_START = ("cli/", "flows/")
LABEL = "sandbox"


def offences(root: Path) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(OWN):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare):
                    parts = [node.left, *node.comparators]
                    if any(isinstance(p, ast.Constant) and p.value == LABEL for p in parts):
                        out.add((rel, "compares with 'sandbox'"))
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "octomed_data.sandbox"
                ):
                    if any(a.name in NAME_CONSTANTS for a in node.names):
                        out.add((rel, "imports a sandbox name constant"))
                    if not rel.startswith(MAY_START):
                        out.add((rel, "imports the sandbox package"))
                elif isinstance(node, ast.Name) and node.id in NAME_CONSTANTS:
                    out.add((rel, "uses a sandbox name constant"))
    return out


# Offenders still to fix (none now); the list only shrinks (a gone one fails).
KNOWN: set[tuple[str, str]] = set()


def test_no_module_checks_for_the_sandbox_by_name() -> None:
    found = offences(ROOT)
    new = sorted(found - KNOWN)
    assert not new, "checks for the sandbox by name (use octomed_data.teachers.is_simulated):\n" + "\n".join(
        f"{f}: {what}" for f, what in new
    )
    gone = sorted(KNOWN - found)
    assert not gone, f"fixed, remove from KNOWN: {gone}"


def test_the_scan_sees_each_kind_of_offence(tmp_path: Path) -> None:
    lib = tmp_path / "octomed_data"
    lib.mkdir()
    (lib / "a.py").write_text("def f(t):\n    return t.name == 'sandbox'\n")
    (lib / "b.py").write_text("from octomed_data.sandbox import SANDBOX_TEACHER\n")
    (lib / "c.py").write_text("from octomed_data.sandbox import start_sandbox\n")
    (lib / "d.py").write_text(
        "from octomed_data.teachers import is_simulated\n\ndef f(t):\n    return is_simulated(t)\n"
    )
    assert offences(tmp_path) == {
        ("octomed_data/a.py", "compares with 'sandbox'"),
        ("octomed_data/b.py", "imports a sandbox name constant"),
        ("octomed_data/b.py", "imports the sandbox package"),
        ("octomed_data/c.py", "imports the sandbox package"),
    }


def test_is_simulated_is_the_rule() -> None:
    from octomed_data.teachers import SIMULATED_LABEL, TeacherConfig, is_simulated, resolve_api_key

    real = TeacherConfig(
        name="r1", base_url="http://127.0.0.1:1/v1", model="m", api_key_env="OCTOMED_NO_SUCH_KEY"
    )
    standin = real.model_copy(update={"simulated": True})
    assert not is_simulated(real) and is_simulated(standin) and is_simulated(SIMULATED_LABEL)
    assert resolve_api_key(standin).get_secret_value()  # a simulated teacher needs no key
    import pytest

    from octomed_data.errors import ConfigError

    with pytest.raises(ConfigError, match="OCTOMED_NO_SUCH_KEY"):
        resolve_api_key(real)
