"""Evaluation as a stage: done = metrics.json of the same settings on the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.harness import marker_hash
from evaluation.stage import EvaluateStage
from octomed_data.job_config import EvalConfig
from octomed_data.layout import RunPaths
from octomed_data.stages import GLOBAL_SHARD


def _metrics(out: Path, config: EvalConfig, marker: dict | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "items": 2, "predictions": 4, "macro_accuracy": 0.5, "per_benchmark": {}, "per_task_type": {},
        "runtime_s": 1.0, "request_errors": 0, "config_hash": config.config_hash(),
        "checkpoint_hash": marker_hash(marker),
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(report))


def test_metrics_of_the_same_settings_on_the_same_checkpoint_are_done(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoints"
    checkpoint.mkdir()
    marker = {"step": 2, "config_hash": "abc", "created_at": "2026-12-06T10:00:00Z"}
    (checkpoint / "checkpoint.json").write_text(json.dumps(marker))
    out = tmp_path / "evaluate"
    config = EvalConfig(model=str(checkpoint), benchmarks="medqa", output_uri=str(out), seeds=2)
    stage = EvaluateStage(RunPaths.at(str(tmp_path)), config)
    assert not stage.is_done(GLOBAL_SHARD)  # nothing evaluated yet
    _metrics(out, config, marker)
    assert stage.is_done(GLOBAL_SHARD)
    assert stage.done_counts(GLOBAL_SHARD)["macro_accuracy"] == 0.5
    # Other settings (where the output goes does not count), or a re-trained checkpoint: not done.
    elsewhere = config.model_copy(update={"work_dir": str(tmp_path / "w")})
    assert EvaluateStage(RunPaths.at(str(tmp_path)), elsewhere).is_done(GLOBAL_SHARD)
    assert not EvaluateStage(RunPaths.at(str(tmp_path)), config.model_copy(update={"seeds": 3})).is_done(
        GLOBAL_SHARD
    )
    (checkpoint / "checkpoint.json").write_text(json.dumps(marker | {"created_at": "later"}))
    assert not stage.is_done(GLOBAL_SHARD)


def test_a_model_without_a_checkpoint_marker_is_evaluated_every_pass(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    out = tmp_path / "evaluate"
    config = EvalConfig(model=str(model), benchmarks="medqa", output_uri=str(out))
    _metrics(out, config, None)
    assert not EvaluateStage(RunPaths.at(str(tmp_path)), config).is_done(GLOBAL_SHARD)
