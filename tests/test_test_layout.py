"""Test modules share helpers through ``tests/support/`` only: no test module (nor conftest, nor a
support module) imports another test module or a helper that lives beside the tests.

The scan reads the source (AST), function-level imports included. Fixtures come from conftest.py
files through pytest, never through an import. The tier rules (``tests/support/tiers.py``) are
checked on examples here too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.support.tiers import heavy_command, real_reason

TESTS = Path(__file__).resolve().parent
ALLOWED = "tests.support"
# Modules under tests/ that are not tests and not support: the answer corpora (data written as
# Python, loaded by path by their test and by benchmarks/) and a re-export kept for benchmarks/.
NOT_SCANNED_DIRS = ("answer_corpus", "audit_data", "fixtures", "release_data")


def _local_names() -> set[str]:
    """Bare module names that resolve to a file beside the tests (pytest's rootdir insertion puts
    each test folder on sys.path, so ``import sft_helpers`` would import a neighbour)."""
    support = TESTS / "support"
    return {p.stem for p in TESTS.rglob("*.py") if p.stem != "__init__" and support not in p.parents}


def offenders(path: Path, source: str, local: set[str]) -> list[str]:
    """``file:line module`` for every import in ``source`` of a test-side module outside tests.support."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            found.append(f"{path}:{node.lineno} relative import")
            continue
        if isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if module == ALLOWED or module.startswith(ALLOWED + "."):
                continue
            if top == "tests" or top in local:
                found.append(f"{path}:{node.lineno} {module}")
    return sorted(found, key=lambda o: int(o.split(":")[1].split()[0]))


def _scanned() -> list[Path]:
    return [
        p
        for p in sorted(TESTS.rglob("*.py"))
        if not any(part in NOT_SCANNED_DIRS for part in p.relative_to(TESTS).parts[:-1])
    ]


def test_no_test_module_imports_another_test_module() -> None:
    local = _local_names()
    files = _scanned()
    assert any(p.name == "conftest.py" for p in files) and any(p.parent.name == "support" for p in files)
    bad = [o for p in files for o in offenders(p.relative_to(TESTS), p.read_text(encoding="utf-8"), local)]
    assert bad == [], "import shared helpers from tests/support/ instead:\n" + "\n".join(bad)


def test_the_scan_catches_each_kind_of_offender() -> None:
    local = {"test_distill", "sft_helpers", "conftest"}
    source = (
        "from tests.distill.test_distill import config\n"
        "import tests.conftest\n"
        "from sft_helpers import run_sft\n"
        "def f():\n"
        "    from tests.test_release import build_run\n"
        "from . import neighbour\n"
        "from tests.support.distill import config\n"
        "import tests.support.net\n"
        "from octomed_data import storage\n"
    )
    assert offenders(Path("t.py"), source, local) == [
        "t.py:1 tests.distill.test_distill",
        "t.py:2 tests.conftest",
        "t.py:3 sft_helpers",
        "t.py:5 tests.test_release",
        "t.py:6 relative import",
    ]


def test_tiers_mark_what_starts_a_real_component() -> None:
    assert real_reason("stages/test_executors.py", "test_x", ["tmp_path", "ray_local"]) == "uses ray_local"
    assert real_reason("real/test_prefect_server.py", "test_x", ["tmp_path"]) == "in real/"
    assert real_reason("training/test_sft.py", "test_failed_job_is_one_line", []) == "listed in REAL_TESTS"
    assert real_reason("training/test_sft.py", "test_global_batch_512_math", ["monkeypatch"]) is None
    assert real_reason("realistic/test_x.py", "test_x", []) is None


def test_the_fast_tier_check_knows_a_real_component_from_a_plain_subprocess() -> None:
    python = sys.executable
    assert heavy_command([python, "-m", "cli", "distill", "q"]) == "cli"
    assert heavy_command([python, "-m", "training.sft", "--config", "c.yaml"]) == "training.sft"
    assert heavy_command(["torchrun", "--nproc_per_node", "2"]) == "torchrun"
    assert heavy_command([str(Path(python).with_name("ray")), "start", "--head"]) == "ray"
    assert heavy_command("/venv/lib/ray/core/src/ray/raylet/raylet --node") == "raylet"
    assert heavy_command([python, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"])
    assert heavy_command([python, "-c", "import hashlib; print(1)"]) is None
    assert heavy_command(["git", "status", "/tmp/ray-results/x"]) is None
    assert heavy_command([python, "-m", "pip", "install", "six"]) == "pip"
    assert heavy_command([python, "-m", "venv", "/tmp/v"]) == "venv"
    assert heavy_command(["/work/.venv/bin/python", "-c", "print('docker-compose.yml')"]) is None
