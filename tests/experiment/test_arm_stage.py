"""An arm as a stage: done = its record COMPLETED for the same settings and the same data."""

from __future__ import annotations

from pathlib import Path

from octomed_data.experiment.arms import write_record
from octomed_data.experiment.stage import ArmStage
from octomed_data.layout import ExperimentPaths
from octomed_data.stages import GLOBAL_SHARD, LocalExecutor, run_stage


def test_a_finished_arm_is_reused_and_other_settings_or_data_run_it(tmp_path: Path) -> None:
    exp = ExperimentPaths(str(tmp_path), "spec")
    runs: list[str] = []

    def job(settings: str, data: str):
        def run() -> dict:
            runs.append(settings + data)
            return write_record(
                exp, "a", {"status": "COMPLETED", "settings": settings, "data": {"fingerprint": data}}
            )

        return run

    def once(settings: str, data: str, **kw) -> str:
        result = run_stage(
            ArmStage(exp, "a", settings, data, job(settings, data), **kw), LocalExecutor(progress=False)
        )
        assert not result.failed, result.failed
        return result.outcomes[GLOBAL_SHARD].state

    assert once("s1", "d1") == "COMPLETED"
    assert once("s1", "d1") == "REUSED"
    assert once("s1", "d2") == "COMPLETED"  # other data
    assert once("s2", "d2") == "COMPLETED"  # other settings
    assert once("s2", "d2", rerun=True) == "COMPLETED"  # --force
    assert runs == ["s1d1", "s1d2", "s2d2", "s2d2"]
    reused = run_stage(ArmStage(exp, "a", "s2", "d2", job("s2", "d2")), LocalExecutor(progress=False))
    assert reused.outcomes[GLOBAL_SHARD].counts["reused"] is True
