"""Every path is named once, in ``octomed_data/layout.py``: no ``storage.join(..., "literal")`` elsewhere.

The scan reads the source (AST): a ``storage.join`` call with a string or f-string argument outside
layout.py is an offender. ``KNOWN`` lists the offenders still waiting for their owner (file::function);
it may only shrink: a new offender fails, and so does a listed one that is gone (remove it from the list).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("octomed_data", "flows", "tasks", "training", "evaluation")
LAYOUT = "octomed_data/layout.py"

KNOWN: set[str] = {
    "evaluation/harness.py::evaluate",
    "flows/experiment.py::_base_model",
    "flows/experiment.py::curve_task",
    "flows/experiment.py::item_images_task",
    "flows/experiment.py::trained_twin",
    "flows/training.py::train_config",
    "octomed_data/cli/distill.py::_cli_filter_difficulty",
    "octomed_data/cli/refilter.py::_downstream",
    "octomed_data/distill/batch.py::BatchRun._save",
    "octomed_data/distill/batch.py::n_support_uri",
    "octomed_data/distill/engine.py::adistill_shard",
    "octomed_data/distill/filtering.py::afilter_by_difficulty",
    "octomed_data/distill/filtering.py::scores_uri",
    "octomed_data/distill/run.py::estimate",
    "octomed_data/distill/run.py::finalize",
    "octomed_data/experiment/arms.py::ExperimentPaths.arm",
    "octomed_data/experiment/arms.py::ExperimentPaths.comparison",
    "octomed_data/experiment/arms.py::ExperimentPaths.curves_plot",
    "octomed_data/experiment/arms.py::ExperimentPaths.models",
    "octomed_data/experiment/arms.py::ExperimentPaths.plot",
    "octomed_data/experiment/arms.py::ExperimentPaths.record",
    "octomed_data/experiment/arms.py::ExperimentPaths.report",
    "octomed_data/experiment/arms.py::ExperimentPaths.root",
    "octomed_data/experiment/arms.py::ExperimentPaths.spec_json",
    "octomed_data/runs.py::checkpoint_lease",
    "octomed_data/runs.py::export_fingerprint",
    "octomed_data/runs.py::shard_lease",
    "octomed_data/runs.py::training_dir",
    "octomed_data/runs.py::training_record_uri",
    "octomed_data/verify/judge.py::journal_shards",
    "training/checkpoints.py::intermediate_checkpoints",
    "training/sft.py::_upload_callback.UploadCheckpoints.on_save",
}


def _is_storage_join(node: ast.Call) -> bool:
    func = node.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "join"
        and isinstance(func.value, ast.Name)
        and func.value.id == "storage"
    )


def _literal(arg: ast.expr) -> bool:
    return isinstance(arg, ast.JoinedStr) or (isinstance(arg, ast.Constant) and isinstance(arg.value, str))


def offenders() -> dict[str, list[int]]:
    """``file::function`` -> lines of its literal ``storage.join`` calls."""
    found: dict[str, list[int]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == LAYOUT:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
            _scan(tree, rel, [], found)
    return found


def _scan(node: ast.AST, rel: str, scope: list[str], found: dict[str, list[int]]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            _scan(child, rel, [*scope, child.name], found)
            continue
        if isinstance(child, ast.Call) and _is_storage_join(child) and any(map(_literal, child.args)):
            found.setdefault(f"{rel}::{'.'.join(scope) or '<module>'}", []).append(child.lineno)
        _scan(child, rel, scope, found)


def test_scan_finds_a_literal_path(tmp_path: Path) -> None:
    tree = ast.parse('def f(out):\n    return storage.join(out, "x.json")\ndef g(p):\n    return p.summary\n')
    found: dict[str, list[int]] = {}
    _scan(tree, "m.py", [], found)
    assert found == {"m.py::f": [2]}


def test_no_new_literal_path_outside_layout() -> None:
    found = offenders()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, (
        "literal storage.join paths outside octomed_data/layout.py (name them in layout.py): "
        + "; ".join(f"{k} (lines {v})" for k, v in sorted(new.items()))
    )


def test_known_offenders_only_shrink() -> None:
    gone = sorted(KNOWN - set(offenders()))
    assert not gone, f"no longer offenders, remove them from KNOWN in {__file__}: {gone}"
