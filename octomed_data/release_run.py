"""What a release reads of the run besides its rows: the recipe as run, the teachers and their sampling
parameters, how the verdicts were made, what decontamination removed (:mod:`octomed_data.release`)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from octomed_data import storage
from octomed_data.errors import StorageError
from octomed_data.layout import RunPaths
from octomed_data.recipe import Recipe, parse_recipe
from octomed_data.teachers import SIMULATED_LABEL, TeacherConfig


def run_recipe(paths: RunPaths) -> Recipe:
    """The recipe the run recorded in ``run.json``."""
    if not storage.exists(paths.run_json):
        raise StorageError(f"no run at {paths.root} (missing {paths.run_json})")
    return parse_recipe(storage.read_json(paths.run_json)["recipe"], where=f"recipe of run {paths.run_id}")


def teacher_configs(paths: RunPaths, recipe: Recipe) -> list[TeacherConfig]:
    """The teachers as distillation last ran them (``distill/_distill/config.json``), else the recipe's."""
    out: list[TeacherConfig] = []
    if storage.exists(paths.distill_config):
        for t in storage.read_json(paths.distill_config).get("teachers", []):
            try:
                out.append(TeacherConfig.model_validate(t))
            except ValidationError:
                continue
    for t in recipe.teachers:  # sandbox-bound recipe teachers ran as the simulated teacher
        data = t.model_dump() | {"base_url": t.base_url or "recipe"}
        out += [TeacherConfig(**data), TeacherConfig(**(data | {"name": SIMULATED_LABEL, "simulated": True}))]
    return out


def sampling_table(teachers: Iterable[TeacherConfig]) -> dict[tuple[str, str], dict[str, Any]]:
    """(teacher, params_hash) -> the sampling params a reply was drawn with."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for t in teachers:
        p = t.sampling_params()
        table.setdefault((t.name, t.params_hash()), p | {"extra_body": json.dumps(p["extra_body"])})
    return table


def verifier_summary(stats: Mapping[str, Any]) -> dict[str, Any]:
    """How the run's verdicts were made (``stats.json``'s verifier section, the judge's cost aside):
    settings, their fingerprint, the judge, verdicts per verifier and the judge's calibration."""
    v = stats.get("verifier") or {}
    return {k: v.get(k) for k in ("settings", "fingerprint", "judge", "verified_by", "calibration")}


def removed_by_benchmark(paths: RunPaths) -> dict[str, int]:
    """Questions the run's decontamination stage removed, per benchmark."""
    removed: Counter[str] = Counter()
    for batch in storage.Dataset(paths.removed).iter_batches(columns=["match_benchmark"]):
        removed.update(batch.column(0).to_pylist())
    return dict(sorted(removed.items()))
