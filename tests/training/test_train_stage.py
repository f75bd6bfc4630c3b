"""Training as a stage: run by run_stage, done = the export's training record, once per export
(and, where the stage names one, per job config); a finished export is answered from its record."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.layout import RunPaths
from octomed_data.recipe import load_recipe
from octomed_data.runs import start_run
from octomed_data.stages import GLOBAL_SHARD, LocalExecutor, run_stage
from training.stage import ALREADY, TrainStage


def _run(tmp_path: Path, rows: int = 3) -> RunPaths:
    paths = start_run(load_recipe("demo"), "t1", str(tmp_path / "store"))
    storage.Dataset(paths.trl_split(True, "train")).write_shard(0, pa.table({"messages": ["[]"] * rows}))
    return paths


def _once(stage: TrainStage):
    result = run_stage(stage, LocalExecutor(progress=False))
    assert not result.failed, result.failed
    return result.outcomes[GLOBAL_SHARD]


def test_a_trained_export_is_not_trained_again_and_answers_its_result(tmp_path: Path) -> None:
    paths = _run(tmp_path)
    calls: list[int] = []

    def job() -> dict:
        calls.append(1)
        return {"steps": 2, "losses": [1.0, 0.5], "skipped": {"bad": 1}}

    first = _once(TrainStage(paths, job))
    assert first.state == "COMPLETED" and first.counts["steps"] == 2 and len(calls) == 1
    again = _once(TrainStage(paths, job))
    assert again.state == "REUSED" and again.counts == first.counts and len(calls) == 1
    # Asked to, it trains again; a new export trains again by itself.
    assert _once(TrainStage(paths, job, rerun=True)).state == "COMPLETED" and len(calls) == 2
    storage.Dataset(paths.trl_split(True, "train")).write_shard(1, pa.table({"messages": ["[]"]}))
    assert _once(TrainStage(paths, job)).state == "COMPLETED" and len(calls) == 3


def test_a_stage_naming_its_job_config_trains_again_when_the_config_changes(tmp_path: Path) -> None:
    paths = _run(tmp_path)
    calls: list[str] = []
    job = lambda name: lambda: calls.append(name) or {"steps": 1}  # noqa: E731
    assert _once(TrainStage(paths, job("a"), config_hash="a")).state == "COMPLETED"
    assert _once(TrainStage(paths, job("a"), config_hash="a")).state == "REUSED"
    assert _once(TrainStage(paths, job("b"), config_hash="b")).state == "COMPLETED"
    assert calls == ["a", "b"]


def test_a_failed_job_is_recorded_and_not_done(tmp_path: Path) -> None:
    paths = _run(tmp_path)

    def boom() -> dict:
        raise RuntimeError("out of memory")

    stage = TrainStage(paths, boom)
    result = run_stage(stage, LocalExecutor(progress=False))
    assert "out of memory" in result.failed[GLOBAL_SHARD]
    assert stage.record()["state"] == "FAILED" and not stage.is_done(GLOBAL_SHARD)


def test_a_trigger_for_the_export_another_job_trains_is_a_no_op(tmp_path: Path) -> None:
    from octomed_data.runs import checkpoint_lease

    paths = _run(tmp_path)
    other = TrainStage(paths, dict, owner="other-flow-run")
    mine = TrainStage(paths, lambda: pytest.fail("trained twice"), owner="this-flow-run")
    with checkpoint_lease(paths, other.owner).hold():
        assert mine.trained_elsewhere() == other.owner
        assert _once(mine).counts == {ALREADY: True}
    assert mine.trained_elsewhere() is None


def test_a_run_without_an_export_is_one_error_line(tmp_path: Path) -> None:
    paths = start_run(load_recipe("demo"), "empty", str(tmp_path / "store"))
    with pytest.raises(ConfigError, match="has no TRL export"):
        TrainStage(paths, dict)
