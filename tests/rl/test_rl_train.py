"""The GRPO job: exactly once per (SFT checkpoint, RL data, settings) as a stage; checkpoints to
s3:// with resume from the last intermediate checkpoint; the SFT vs SFT+RL table."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from octomed_data import storage
from octomed_data.layout import CheckpointFolder
from octomed_data.recipe import load_recipe
from octomed_data.runs import start_run
from octomed_data.stages import GLOBAL_SHARD, LocalExecutor, run_stage
from training.rl import RLJob
from training.rl_stage import RLStage

OPTIONS = [{"label": "A", "text": "aspirin"}, {"label": "B", "text": "heparin"}]


def _job(tmp: Path, output: str, **trainer) -> RLJob:
    return RLJob(
        model_uri=str(tmp / "model"),
        data_uri=str(tmp / "rl-data"),
        output_uri=output,
        metrics_uri=f"{output}-metrics.jsonl",
        plot_uri=f"{output}-rl.png",
        work_dir=str(tmp / "work"),
        trainer={"max_steps": 2, "num_generations": 2, "per_device_train_batch_size": 2}
        | {"max_completion_length": 8, "save_steps": 1}
        | trainer,
        inputs={"sft": {"uri": "s", "created_at": "t1"}, "rl_data": "d1"},
    )


def _once(stage: RLStage):
    result = run_stage(stage, LocalExecutor(progress=False))
    assert not result.failed, result.failed
    return result.outcomes[GLOBAL_SHARD]


def test_the_rl_stage_trains_once_per_checkpoint_data_and_settings(tmp_path: Path) -> None:
    paths = start_run(load_recipe("demo"), "r1", str(tmp_path / "store"))
    calls: list[str] = []

    def stage(job: RLJob) -> RLStage:
        return RLStage(paths, job, lambda: calls.append(job.config_hash()) or {"steps": 2})

    job = _job(tmp_path, "out")
    assert _once(stage(job)).state == "COMPLETED"
    assert _once(stage(job)).state == "REUSED" and len(calls) == 1
    # Where files go is no setting; another SFT checkpoint, RL data or setting is another job.
    assert _once(stage(job.model_copy(update={"work_dir": "elsewhere"}))).state == "REUSED"
    others = [
        job.model_copy(update={"inputs": {"sft": {"uri": "s", "created_at": "t2"}, "rl_data": "d1"}}),
        job.model_copy(update={"inputs": {"sft": {"uri": "s", "created_at": "t1"}, "rl_data": "d2"}}),
        _job(tmp_path, "out", learning_rate=1e-5),
    ]
    for other in others:
        assert _once(stage(other)).state == "COMPLETED"
    assert len(calls) == 4 and len(set(calls)) == 4
    assert storage.read_json(paths.state_uri("rl", job.config_hash()))["state"] == "COMPLETED"


def test_a_sandbox_bound_judge_is_refused_in_one_line_before_anything_runs(tmp_path: Path) -> None:
    from octomed_data.errors import ConfigError
    from octomed_data.recipe import Recipe
    from training.rl_stage import rl_job

    data = load_recipe("demo").model_dump(mode="json") | {"verify": {"default": "judge"}}
    recipe = Recipe.model_validate(data)
    paths = start_run(recipe, "j1", str(tmp_path / "store"))
    with pytest.raises(ConfigError, match="the judge is the sandbox teacher"):
        rl_job(recipe, paths, sft_checkpoint=paths.checkpoints, work_dir=str(tmp_path / "w"))


def _predictions(uri: str, correct: dict[str, list[bool]]) -> None:
    rows = [
        {"benchmark": "medqa", "question_id": q, "task_type": "text_mcq", "seed": s, "correct": ok}
        for q, per_seed in correct.items()
        for s, ok in enumerate(per_seed)
    ]
    storage.Dataset(uri).write_shard(0, pa.Table.from_pylist(rows))


def test_the_comparison_pairs_items_and_seeds_with_the_labs_bootstrap(tmp_path: Path) -> None:
    from flows.rl import comparison_markdown

    _predictions(str(tmp_path / "sft"), {f"q{i}": [False, False] for i in range(10)})
    _predictions(str(tmp_path / "rl"), {f"q{i}": [True, True] for i in range(10)} | {"extra": [True, True]})
    markdown, rows = comparison_markdown(str(tmp_path / "sft"), str(tmp_path / "rl"), "t")
    (row,) = rows
    assert row["items"] == 10 and row["sft"] == 0.0 and row["sft_rl"] == 1.0  # "extra": SFT never answered
    assert row["delta"] == 1.0 and row["beyond_noise"]
    assert "| medqa | 10 | 2 | 0.0 | 100.0 | +100.0 | [+100.0, +100.0] | yes |" in markdown


@pytest.fixture
def rl_data(tmp_path: Path) -> Path:
    from training.tiny import build_text_model

    build_text_model(tmp_path / "model")
    rows = [
        {
            "question_id": f"q{i}",
            "source": "s",
            "task_type": "text_mcq",
            "split": "train",
            "prompt": [{"role": "user", "content": f"Which drug for case {i}?\nA. aspirin\nB. heparin"}],
            "images": [],
            "gold_answer": "A",
            "answer_text": "aspirin",
            "options": OPTIONS,
            "pass_rate": 0.5,
            "samples": 4,
        }
        for i in range(4)
    ]
    storage.Dataset(str(tmp_path / "rl-data")).write_shard(0, pa.Table.from_pylist(rows))
    return tmp_path


def test_grpo_checkpoints_to_s3_and_a_killed_job_resumes_from_its_last_checkpoint(rl_data, s3_bucket) -> None:
    from training.rl import train_grpo

    out = f"{s3_bucket}/rl/checkpoints"
    job = _job(rl_data, out)
    first = train_grpo(job)
    assert first["steps"] == 2 and first["resumed_from_step"] == 0 and not first["trained_already"]
    final = storage.read_json(CheckpointFolder(out).marker)
    assert final["final"] and final["config_hash"] == job.config_hash()
    assert storage.exists(CheckpointFolder(out).step("checkpoint-1"))
    # The same job again: nothing trained.
    assert train_grpo(job)["trained_already"]
    # Killed after step 1 (its final marker and step 2's never written): resumes at step 1.
    fs, _ = storage.filesystem(out)
    fs.rm(CheckpointFolder(out).marker.removeprefix("s3://"))
    fs.rm(CheckpointFolder(CheckpointFolder(out).step("checkpoint-2")).marker.removeprefix("s3://"))
    again = train_grpo(job)
    assert again["resumed_from_step"] == 1 and again["steps"] == 2 and not again["trained_already"]
    metrics = [json.loads(x) for x in storage.read_bytes(job.metrics_uri).decode().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert storage.read_json(CheckpointFolder(out).marker)["step"] == 2


def test_a_judged_recipe_gives_the_job_its_judge_and_the_rewards_ask_it(tmp_path: Path, monkeypatch) -> None:
    from octomed_data.recipe import Recipe
    from octomed_data.sandbox import start_sandbox
    from tests.support.rl import open_question
    from training.rl import job_rewards
    from training.rl_stage import judge_of

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-rl-judge")
    qs = [open_question(i) for i in range(3)]
    columns = {
        "question_id": [q["question_id"] for q in qs],
        "task_type": [q["task_type"] for q in qs],
        "options": [q["options"] for q in qs],
        "gold_answer": [q["answer"] for q in qs],
    }
    replies = ["Final answer: \\boxed{the Vellum-0 gland}", "Final answer: \\boxed{vellum gland 1}",
               "Final answer: \\boxed{the spleen}"]  # fmt: skip
    with start_sandbox() as sb:
        data = load_recipe("demo").model_dump(mode="json") | {"verify": {"default": "judge"}}
        data["teachers"][0] |= {"base_url": sb.base_url, "model": "sandbox-judge", "temperature": 0.0}
        judge = judge_of(Recipe.model_validate(data))
        assert judge is not None and judge["model"] == "sandbox-judge"
        job = _job(tmp_path, "out").model_copy(
            update={"verify": {"default": "judge"}, "judge": judge, "judge_journal": str(tmp_path / "judge")}
        )
        assert "sk-test-rl-judge" not in job.model_dump_json()  # the key is read where the job runs
        rewards = job_rewards(job)[0](None, replies, **columns)
        asked = sum(1 for e in sb.stats()["log"] if e["kind"] == "judge")
    assert rewards[1] == 1.0 and rewards[2] == 0.0  # normalized match; the judge says no
    assert asked == 2 and list((tmp_path / "judge").rglob("*"))  # journalled in the job's folder
    assert job.config_hash() != _job(tmp_path, "out").config_hash()
