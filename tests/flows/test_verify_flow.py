"""The recipe's ``verify:`` block through the factory flow: the filter flow starts the sandbox judge
for a teacher with no endpoint, judges the open answers, and stats.json and the run report carry
the judge's calibration on closed replies."""

from __future__ import annotations

from pathlib import Path

import yaml

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.schema import VERDICT_SCHEMA

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "octomed_data" / "sample_data"


def test_factory_filter_verifies_open_answers_with_the_sandbox_judge(prefect_harness, ray_local, tmp_path):
    from flows.common import RunParams
    from flows.factory import factory_flow

    recipe = {
        "name": "verifytest",
        "store": str(tmp_path / "store"),
        "shard_size": 40,
        "sources": [
            {
                "format": "pathvqa",
                "input": str(SAMPLE_DATA / "pathvqa" / "QA_pairs_vb.sample80.json"),
                "name": "pathvqa",
            }
        ],
        "decontam": {"enabled": False},
        "distill": {"samples": 2, "sandbox": {"faults": {"judge_error": 0.2}}},
        "verify": {"sources": {"pathvqa": "judge"}, "calibration_samples": 30},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    factory_flow(
        run=RunParams(recipe_path=str(path), run_id="verify"),
        stages=["ingest", "decontaminate", "distill", "filter"],
    )
    paths = RunPaths(str(tmp_path / "store"), "verify")
    rows = list(storage.Dataset(paths.verdicts, VERDICT_SCHEMA).iter_rows())
    open_rows = [r for r in rows if r["task_type"] == "open_qa" and r["verifier"]]
    assert open_rows and {r["verifier"] for r in open_rows} <= {"normalized", "judge"}
    assert any(r["verifier"] == "judge" for r in open_rows)
    calibration = [r for r in rows if r["task_type"] == "yes_no_maybe" and r["judge_correct"] is not None]
    assert 0 < len(calibration) <= 2 * 30  # two shards of 40 questions
    stats = storage.read_json(paths.stats)
    overall = stats["verifier"]["calibration"]["overall"]
    assert overall["judged"] == len(calibration)
    assert overall["agreement"] == round(
        sum(r["correct"] == r["judge_correct"] for r in calibration) / len(calibration), 4
    )
    assert stats["verifier"]["judge_cost"]["model"] == "sandbox-not-a-model"
    report = storage.read_bytes(storage.join(paths.report, "report.md")).decode()
    assert "LLM judge calibration" in report
