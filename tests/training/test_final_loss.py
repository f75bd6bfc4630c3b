"""``final_loss`` is the loss at the last step: Trainer logs every ``logging_steps`` (and the first
step), so a 3-step run with logging every 10 steps used to report the step-1 loss."""

from __future__ import annotations

import math

import yaml

from octomed_data import storage
from octomed_data.export import LLAMAFACTORY_SCHEMA
from tests.support.sft import run_sft, training_rows
from training.sft import final_loss_of


def test_final_loss_of_reads_the_last_steps_log_entry() -> None:
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 10}, {"train_loss": 1.7, "step": 13}]
    assert final_loss_of(history, 10) == 1.5
    assert final_loss_of(history + [{"loss": 1.2, "step": 13}], 13) == 1.2
    assert final_loss_of(history, 13) is None  # no loss logged at the last step


def test_final_loss_is_the_last_steps_loss_in_the_result_and_checkpoint_json(tmp_path) -> None:
    from training.tiny import build_text_model

    model = build_text_model(tmp_path / "tiny")
    export = storage.Dataset(str(tmp_path / "export"), LLAMAFACTORY_SCHEMA)
    export.write_shard(0, training_rows(8))
    cfg = {
        "train_data": [export.uri],
        "model_path": str(model),
        "output_uri": str(tmp_path / "checkpoint"),
        "global_batch_size": 2,
        "per_device_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "max_seq_len": 256,
        "zero_stage": 0,
        "logging_steps": 10,  # Trainer alone logs step 1 only
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    result = run_sft(tmp_path / "train.yaml")
    assert result["steps"] == 3
    # Logged: step 1 (logging_first_step) and the last step; final_loss is the last step's.
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert result["final_loss"] == result["losses"][-1] != result["losses"][0]
    marker = storage.read_json(str(tmp_path / "checkpoint" / "checkpoint.json"))
    assert marker["step"] == 3 and marker["loss"] == result["final_loss"]
