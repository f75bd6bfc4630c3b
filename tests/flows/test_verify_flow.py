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


def test_run_with_a_changed_verify_block_rejudges_the_run_without_distilling(
    prefect_harness, tmp_path, capsys
):
    """Issue 21: ``run RECIPE --run-id R --stage filter`` with a new verify block judged with the
    settings saved in run.json. Now the recipe's verify block re-judges every shard, no teacher
    request for distillation, and run.json and the history record the new settings; the other
    recipe blocks the run keeps are named in one line. The filter flow's ``verify`` parameter (the
    deployment's UI field) does the same."""
    import os

    from cli import main
    from flows.common import RunParams
    from flows.filter import filter_flow
    from octomed_data.rejection import read_verify_history
    from octomed_data.runs import open_run
    from octomed_data.sandbox import FaultConfig, start_sandbox
    from octomed_data.stages.filter import FilterStage
    from tests.support.rejudge import JUDGE, KEY_ENV, build_run, markers, requests_by_kind, write_recipe

    os.environ[KEY_ENV] = "sk-rejudge-flow"
    try:
        with start_sandbox(faults=FaultConfig(judge_error=0.3, seed=5)) as sandbox:
            store = tmp_path / "store"
            paths = build_run(store, sandbox.base_url)
            before = markers(paths)
            mark = requests_by_kind(sandbox)
            recipe = yaml.safe_load(open(write_recipe(tmp_path / "r.yaml", store, sandbox.base_url, JUDGE)))
            recipe["mixture"] = {"seed": 7}  # a block the resumed run does not take
            (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
            capsys.readouterr()
            argv = ["run", str(tmp_path / "r.yaml"), "--run-id", paths.run_id, "--stage", "filter"]
            assert main(argv) == 0
            out = capsys.readouterr().out
            after = requests_by_kind(sandbox)
            judged, judged_markers = (
                list(storage.Dataset(paths.verdicts, VERDICT_SCHEMA).iter_rows()),
                markers(paths),
            )
            saved, _ = open_run(paths.run_id, paths.store)
            # The UI's way: the filter deployment's `verify` field (here: back to exact match).
            filter_flow(run=RunParams(run_id=paths.run_id, store=paths.store), verify={"default": "exact"})
            assert requests_by_kind(sandbox) == after  # no request of any kind
    finally:
        os.environ.pop(KEY_ENV, None)
    assert after.get("sample", 0) == mark.get("sample", 0)  # no distillation request
    assert after.get("judge", 0) > mark.get("judge", 0)
    notes = [line for line in out.splitlines() if line.startswith("note: run")]
    assert len(notes) == 1 and "mixture" in notes[0]
    assert saved.verify.mode_for("pathvqa") == "judge" and saved.mixture.seed == 0
    stage = FilterStage.for_recipe(paths, saved)
    assert judged_markers.keys() == before.keys()
    for shard, info in judged_markers.items():
        assert info.extra["fingerprint"] == stage.fingerprint() != before[shard].extra["fingerprint"]
    assert any(r["verifier"] == "judge" for r in judged)
    rows = list(storage.Dataset(paths.verdicts, VERDICT_SCHEMA).iter_rows())
    assert len(rows) == len(judged) and {r["verifier"] for r in rows} - {None} == {"exact"}
    history = read_verify_history(paths.verify_history)
    assert [h["event"] for h in history] == ["judged", "changed", "judged", "changed", "judged"]
    assert [history[1]["by"], history[3]["by"]] == ["factory flow", "filter flow"]
    assert open_run(paths.run_id, paths.store)[0].verify.sources == {}
