"""The recipe (typed, validated when it loads, one error line) and runs (start, re-open, attempts)."""

from __future__ import annotations

import pytest
import yaml

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.layout import RunPaths
from octomed_data.recipe import load_recipe
from octomed_data.runs import check_run_id, open_run, record_shard, shard_states, start_run
from octomed_data.stages import Runtime


def write(tmp_path, data: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_demo_recipe_loads_and_resolves_packaged_paths() -> None:
    recipe = load_recipe("demo")
    assert recipe.training.enabled and recipe.training.config.max_steps == 2
    assert all("://" in e["input"] or e["input"].startswith("/") for e in recipe.ingest_entries())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"training": {"config": {"learning_rat": 1e-5}}}, "training.config: learning_rat: Extra inputs"),
        ({"training": {"config": {"global_batch_size": 0}}}, "training.config: global_batch_size"),
        ({"training": {"launcher": "slurm"}}, "training.launcher"),
        ({"evaluation": {"config": {"seeds": 0}}}, "evaluation.config: seeds"),
        ({"evaluation": {"config": {"temperatur": 0.3}}}, "evaluation.config: temperatur"),
        ({"distill": {"samples": 0}}, "distill.samples"),
        ({"shard_size": "many"}, "shard_size"),
        ({"audit": {"agree_share": 0.4}}, "audit.agree_share"),
    ],
)
def test_a_bad_setting_fails_when_the_recipe_loads_in_one_line(override, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe("demo", override)
    text = str(info.value)
    assert message in text and "\n" not in text and "Value error," not in text


def test_sandbox_teacher_keeps_the_recipe_prices() -> None:
    # The cost ledger prices sandbox replies at them (marked simulated): a demo shows a real cost.
    cfg = load_recipe("demo").distill_config("http://127.0.0.1:9/v1")
    sandbox = cfg.teacher("sandbox")
    assert (sandbox.price_prompt_per_1m, sandbox.price_completion_per_1m) == (0.55, 2.19)


def test_environment_teacher_declares_its_modalities(monkeypatch) -> None:
    from octomed_data.recipe import ENV_TEACHER_BASE_URL, ENV_TEACHER_MODALITIES, ENV_TEACHER_MODEL

    monkeypatch.setenv(ENV_TEACHER_BASE_URL, "http://127.0.0.1:9/v1")
    monkeypatch.setenv(ENV_TEACHER_MODEL, "gpt-4o")
    teacher = load_recipe("demo").distill_config().teachers[0]
    assert teacher.takes_images is None  # undeclared: an image question is refused, not sent
    with pytest.raises(ConfigError, match="modalities are not declared"):
        load_recipe("demo").distill_config().teacher_for("imaging_cls", has_image=True)
    monkeypatch.setenv(ENV_TEACHER_MODALITIES, "text,image")
    cfg = load_recipe("demo").distill_config()
    assert (
        cfg.teachers[0].takes_images is True
        and cfg.teacher_for("imaging_cls", has_image=True).model == "gpt-4o"
    )
    monkeypatch.setenv(ENV_TEACHER_MODALITIES, "text")
    with pytest.raises(ConfigError, match="reads text only"):
        load_recipe("demo").distill_config().teacher_for("open_vqa", has_image=True)


def test_audit_settings_reach_the_filter_stage(tmp_path) -> None:
    from octomed_data.stages.filter import FilterStage

    recipe = load_recipe("demo", {"audit": {"min_samples": 2, "agree_share": 0.9}})
    stage = FilterStage.for_recipe(RunPaths(str(tmp_path), "r1"), recipe)
    assert (stage.audit.min_samples, stage.audit.agree_share) == (2, 0.9)
    assert stage.bind(Runtime()).audit == stage.audit


def test_recipe_file_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(bad))
    with pytest.raises(ConfigError, match="unknown_block"):
        load_recipe(write(tmp_path, {"unknown_block": 1}))


def test_runs_start_reopen_and_record_attempts(tmp_path) -> None:
    recipe = load_recipe("demo")
    paths = start_run(recipe, "r-1", str(tmp_path / "store"))
    assert paths == RunPaths(str(tmp_path / "store"), "r-1") and storage.exists(paths.run_json)
    # Re-opening keeps the recorded recipe, whatever the file says now.
    again, reopened = open_run("r-1", str(tmp_path / "store"))
    assert reopened == paths and again.public_dict() == recipe.public_dict()
    with pytest.raises(StorageError, match="no run 'nope'"):
        open_run("nope", str(tmp_path / "store"))
    with pytest.raises(ConfigError, match="invalid run id"):
        check_run_id("../escape")
    record_shard(paths, "distill", "00001", "FAILED", error="x")
    record_shard(paths, "distill", "00000", "COMPLETED", samples=4)
    record_shard(paths, "ingest", "medqa", "COMPLETED")
    states = shard_states(paths)
    assert [(s["stage"], s["shard"]) for s in states] == [
        ("ingest", "medqa"),
        ("distill", "00000"),
        ("distill", "00001"),
    ]


def test_layout_names_every_stage_output(tmp_path) -> None:
    paths = RunPaths(str(tmp_path), "r")
    outputs = [
        paths.ingested,
        paths.quarantine,
        paths.ingest_entries,
        paths.questions,
        paths.removed,
        paths.decontam_index,
        paths.raw,
        paths.cost,
        paths.verdicts,
        paths.accepted,
        paths.stats,
        paths.mixture_train,
        paths.mixture_validation,
        paths.export,
        paths.checkpoints,
        paths.evaluation,
        paths.report,
    ]
    assert len(set(outputs)) == len(outputs) and all(o.startswith(paths.root) for o in outputs)
    assert RunPaths.at(str(tmp_path / "out")).raw == str(tmp_path / "out" / "distill" / "raw")
    with pytest.raises(ValueError, match="unknown stage folder"):
        paths.stage("distil")


def test_training_and_evaluation_blocks_are_typed_and_filled_in_per_run() -> None:
    """The recipe's blocks are the job settings themselves: a run adds only its locations."""
    from octomed_data.job_config import EvalConfig, EvalOptions, TrainConfig, TrainOptions

    recipe = load_recipe("demo")
    assert isinstance(recipe.training.config, TrainOptions) and isinstance(
        recipe.evaluation.config, EvalOptions
    )
    job = recipe.training.config.job(["a.parquet"], "out", model_path="m")
    written = {"max_steps": 2, "global_batch_size": 2, "per_device_batch_size": 1, "max_seq_len": 1024}
    same = TrainConfig(
        train_data=["a.parquet"],
        output_uri="out",
        model_path="m",
        zero_stage=2,
        gradient_checkpointing=False,
        **written,
    )
    assert job == same and job.config_hash() == same.config_hash()
    ev = recipe.evaluation.config.job("ckpt", benchmarks=["medqa"])
    assert isinstance(ev, EvalConfig) and (ev.model, ev.seeds, ev.limit, ev.prefill_think) == (
        "ckpt",
        2,
        4,
        True,
    )
    # run.json keeps the blocks as written (not every default), and reads back to the same recipe.
    public = recipe.public_dict()
    assert public["training"]["config"] == written | {"zero_stage": 2, "gradient_checkpointing": False}
    assert load_recipe(overrides={}) == recipe and type(recipe).model_validate(public) == recipe


def test_evaluation_endpoint_settings_take_the_teachers_names_old_names_warn(caplog) -> None:
    from octomed_data.job_config import EvalConfig
    from octomed_data.teachers import TeacherConfig

    assert {"max_in_flight", "timeout_s"} <= set(TeacherConfig.model_fields)
    with caplog.at_level("WARNING", logger="octomed_data.job_config"):
        old = EvalConfig(model="m", benchmarks="medqa", concurrency=4, request_timeout_s=9)
    assert (old.max_in_flight, old.timeout_s) == (4, 9.0)
    assert "'concurrency' is deprecated: use 'max_in_flight'" in caplog.text
    assert "'request_timeout_s' is deprecated: use 'timeout_s'" in caplog.text
    both = EvalConfig(model="m", benchmarks="medqa", concurrency=4, max_in_flight=7)
    assert both.max_in_flight == 7  # the new name wins
    recipe = load_recipe(overrides={"evaluation": {"config": {"concurrency": 3, "request_timeout_s": 5}}})
    assert (recipe.evaluation.config.max_in_flight, recipe.evaluation.config.timeout_s) == (3, 5.0)
    assert "concurrency" not in EvalConfig.model_fields and "request_timeout_s" not in EvalConfig.model_fields
