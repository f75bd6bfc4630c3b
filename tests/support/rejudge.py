"""A small finished run for the re-judge tests: real PathVQA textbook pairs (open_qa + yes/no,
``octomed_data/sample_data/pathvqa``, MIT) distilled by a sandbox teacher the TEST owns (its
``base_url`` is in the recipe), so every request the factory makes later is counted there."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.recipe import load_recipe
from octomed_data.runs import start_run
from octomed_data.schema import VERDICT_SCHEMA
from octomed_data.stages import LocalExecutor, raise_for_failures, run_stage
from octomed_data.stages.decontaminate import DecontaminateStage
from octomed_data.stages.distill import DistillStage
from octomed_data.stages.filter import FilterStage
from octomed_data.stages.ingest import IngestStage

SAMPLE = Path(__file__).resolve().parents[2] / "octomed_data" / "sample_data"
RUN_ID = "rejudge"
KEY_ENV = "OCTOMED_REJUDGE_TEST_KEY"
JUDGE = {"sources": {"pathvqa": "judge"}, "calibration_samples": 10}


def recipe_dict(store: Path, base_url: str, verify: dict | None = None) -> dict[str, Any]:
    """The recipe of the run (two shards of 40 PathVQA pairs, 2 samples each)."""
    recipe = load_recipe(
        "demo",
        overrides={
            "name": "rejudge",
            "store": str(store),
            "shard_size": 40,
            "sources_file": None,
            "sources": [
                {
                    "format": "pathvqa",
                    "input": str(SAMPLE / "pathvqa" / "QA_pairs_vb.sample80.json"),
                    "name": "pathvqa",
                }
            ],
            "decontam": {"enabled": False},
            "distill": {"samples": 2},
            "teachers": [
                {"name": "default", "base_url": base_url, "model": "sandbox-r1", "api_key_env": KEY_ENV}
            ],
            "verify": verify or {},
            "training": {"enabled": False},
            "evaluation": {"enabled": False},
        },
    )
    return recipe.public_dict()


def write_recipe(path: Path, store: Path, base_url: str, verify: dict | None = None) -> str:
    path.write_text(yaml.safe_dump(recipe_dict(store, base_url, verify)))
    return str(path)


def build_run(store: Path, base_url: str) -> RunPaths:
    """ingest -> decontaminate (off) -> distill -> filter (exact match), with the library's stages."""
    from octomed_data.recipe import parse_recipe

    recipe = parse_recipe(recipe_dict(store, base_url))
    paths = start_run(recipe, RUN_ID)
    for stage in (
        IngestStage.for_run(paths, recipe.ingest_entries(), recipe.shard_size),
        DecontaminateStage.for_run(paths, recipe.decontam),
        DistillStage(paths, recipe.distill_config()),
        FilterStage.for_recipe(paths, recipe),
    ):
        raise_for_failures(run_stage(stage, LocalExecutor(progress=False)))
    return paths


def copy_run(paths: RunPaths, store: Path) -> RunPaths:
    """A copy of the finished run under another store (each test changes its own)."""
    shutil.copytree(Path(paths.store), store)
    return RunPaths(str(store), paths.run_id)


def requests_by_kind(sandbox) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in sandbox.stats()["log"]:
        out[entry["kind"]] = out.get(entry["kind"], 0) + 1
    return out


def verdicts(paths: RunPaths) -> dict[tuple[str, int], dict]:
    rows = storage.Dataset(paths.verdicts, VERDICT_SCHEMA).read_all().to_pylist()
    return {(r["question_id"], r["sample_idx"]): r for r in rows}


def markers(paths: RunPaths) -> dict[str, Any]:
    """verdict shard -> its committed marker (fingerprint, commit time)."""
    return dict(storage.Dataset(paths.verdicts).manifest())
