"""Training exactly once at every level (issue 24): a finished job trains nothing, a larger
``max_steps`` extends it from its last checkpoint, a job killed before its final marker finishes
without training past ``max_steps``, other settings are named (and forced into a new folder), and
``kill -9`` of the train command leaves no launcher or worker behind. Also: training refuses data
holding an API key (issue 25).

The real tests run the tiny model through torchrun + DeepSpeed ZeRO-2 on CPU with checkpoints on
the loopback S3 server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.export import LLAMAFACTORY_SCHEMA
from octomed_data.job_config import TrainConfig
from tests.support.sft import REPO, run_sft, small_job, training_rows, weights_hash
from training.once import ENV_KILL_BEFORE_FINAL_MARKER, prior_training, resumable, route_output

KEY = "sk-test-0123456789abcdefghij"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from training.tiny import build_text_model

    return build_text_model(tmp_path_factory.mktemp("tiny") / "text")


@pytest.fixture(scope="module")
def export_uri(tmp_path_factory) -> str:
    export = storage.Dataset(str(tmp_path_factory.mktemp("once") / "export"), LLAMAFACTORY_SCHEMA)
    export.write_shard(0, training_rows(8))
    return export.uri


def _manifest(config: TrainConfig) -> list[dict]:
    from training.data import resolve_data_files

    return [{"uri": f.uri, "rows": f.rows} for f in resolve_data_files(config.train_data)]


def _finished(config: TrainConfig, step: int) -> None:
    """A finished training's marker, as ``save_final`` writes it (no weights: the logic only)."""
    marker = {"config": config.model_dump(), "data_manifest": _manifest(config), "step": step, "final": True}
    storage.write_json(f"{config.output_uri}/checkpoint.json", marker)


# --------------------------------------------------------------------------- the rules (fast)


def test_a_finished_training_is_done_extended_or_named(tmp_path, export_uri) -> None:
    job = small_job(export_uri, tmp_path / "model", str(tmp_path / "out"), tmp_path / "work")
    manifest = _manifest(job)
    assert prior_training(job, manifest).state == "none"
    assert route_output(job, manifest, force=False) == (job, f"training into {job.output_uri}")
    _finished(job, 2)
    assert prior_training(job, manifest).state == "done"
    assert "nothing to train" in route_output(job, manifest, force=False)[1]
    # Only a larger max_steps: extended from the finished run (the same folder).
    longer = job.model_copy(update={"max_steps": 5, "save_steps": 3, "logging_steps": 7})
    assert prior_training(longer, manifest).state == "extend"
    assert route_output(longer, manifest, force=False)[0].output_uri == job.output_uri
    # Other settings (a smaller max_steps too): named in one line, refused unless forced.
    other = job.model_copy(update={"learning_rate": 1e-3, "max_steps": 1})
    prior = prior_training(other, manifest)
    assert prior.state == "other" and prior.describe() == "learning_rate 0.002 -> 0.001, max_steps 2 -> 1"
    with pytest.raises(
        ConfigError, match=r"holds a finished training with other settings \(learning_rate"
    ) as exc:
        route_output(other, manifest, force=False)
    assert "\n" not in str(exc.value) and f"{job.output_uri}-{other.config_hash()}" in str(exc.value)
    forced, line = route_output(other, manifest, force=True)
    assert forced.output_uri == f"{job.output_uri}-{other.config_hash()}" and "old model is kept" in line
    # Other data (a new export) is trained on from step 0 in the run's folder, said so.
    new_manifest = manifest + [{"uri": "x/part-1.parquet", "rows": 3}]
    assert prior_training(job, new_manifest).other_data
    assert route_output(job, new_manifest, force=False)[0] == job


def test_which_intermediate_checkpoints_a_job_continues(tmp_path, export_uri) -> None:
    job = small_job(export_uri, tmp_path / "model", str(tmp_path / "out"), tmp_path / "work", max_steps=4)
    manifest = _manifest(job)

    def marker(step: int, **settings) -> dict:
        return {
            "config": job.model_copy(update=settings).model_dump(),
            "data_manifest": manifest,
            "step": step,
        }

    assert resumable(marker(2), job, manifest)
    assert resumable(marker(2, max_steps=2), job, manifest)  # an extension of a shorter run
    assert not resumable(marker(4, max_steps=6), job, manifest)  # a longer run's checkpoints
    assert not resumable(marker(6, max_steps=6), job, manifest)  # past max_steps
    assert not resumable(marker(2, learning_rate=1e-3), job, manifest)
    assert not resumable(marker(2), job, manifest + [{"uri": "x", "rows": 1}])
    # Where checkpoints go or how often is not a setting.
    assert resumable(marker(2, save_steps=1, output_uri="elsewhere"), job, manifest)


def test_training_refuses_data_holding_an_api_key(tmp_path, monkeypatch) -> None:
    from training.data import refuse_secrets, resolve_data_files

    rows = training_rows(3)
    rows[2]["messages"][-1]["content"] = f"Final answer: A (via {KEY})"
    export = storage.Dataset(str(tmp_path / "export"), LLAMAFACTORY_SCHEMA)
    export.write_shard(0, rows)
    files = resolve_data_files([export.uri])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    refuse_secrets(files, ["OPENAI_API_KEY"])  # no key in the environment: nothing to find
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with pytest.raises(ConfigError, match=r"^training data .* holds the API key of \$OPENAI_API_KEY") as exc:
        refuse_secrets(files, TrainConfig(train_data="x", model_path="m", output_uri="o").secret_env_names)
    assert "\n" not in str(exc.value) and KEY not in str(exc.value) and "nothing trained" in str(exc.value)
    refuse_secrets(resolve_data_files([export.uri]), ["OTHER_KEY"])  # only the named variables


def test_the_train_form_says_run_id_is_required_and_offers_force() -> None:
    from flows.common import RunParams
    from flows.train import TrainParams

    schema = TrainParams.model_json_schema()
    run_id = schema["$defs"]["TrainRunParams"]["properties"]["run_id"]["description"]
    assert run_id.startswith("Required") and "new run" not in run_id
    assert schema["properties"]["force"]["default"] is False
    assert TrainParams(run=RunParams(run_id="r")).run.run_id == "r"  # what the deployments hand over


# --------------------------------------------------------------------------- real jobs (torchrun, S3)


def test_rerun_trains_nothing_and_a_larger_max_steps_extends(tiny, export_uri, s3_bucket, tmp_path) -> None:
    from training.launch import launch_training

    job = small_job(export_uri, tiny, f"{s3_bucket}/once", tmp_path / "work")
    first = launch_training(job, work_dir=tmp_path / "job", launcher="torchrun", processes=1, force=False)
    assert first["steps"] == 2 and not first["trained_already"]
    weights, marker = weights_hash(job.output_uri), storage.read_json(f"{job.output_uri}/checkpoint.json")
    for _ in range(2):  # the same job again: no step trained, no process started, nothing rewritten
        lines: list[str] = []
        again = launch_training(
            job,
            work_dir=tmp_path / "job",
            launcher="torchrun",
            processes=1,
            force=False,
            on_line=lines.append,
        )
        assert again["trained_already"] and again["steps"] == 2 and again["samples_seen"] == 0
        assert lines == [
            f"{job.output_uri} is trained already with these settings (step 2); nothing to train"
        ]
        assert weights_hash(job.output_uri) == weights
        assert storage.read_json(f"{job.output_uri}/checkpoint.json") == marker

    # Only max_steps raised: the finished run goes on from its last checkpoint.
    lines = []
    longer = launch_training(
        job.model_copy(update={"max_steps": 3}),
        work_dir=tmp_path / "job",
        launcher="torchrun",
        processes=1,
        force=False,
        on_line=lines.append,
    )
    assert longer["steps"] == 3 and longer["resumed_from_step"] == 2 and longer["samples_seen"] == 4
    assert any(f"resuming from {job.output_uri}/checkpoints/checkpoint-2 (step 2)" in line for line in lines)
    assert storage.read_json(f"{job.output_uri}/checkpoint.json")["step"] == 3


def test_kill_before_final_marker_then_rerun(tiny, export_uri, s3_bucket, tmp_path, monkeypatch) -> None:
    """A job killed (SIGKILL) after its last checkpoint, before its final marker: the re-run writes
    the final model from that checkpoint and trains no step past max_steps."""
    from training.launch import TrainingFailed, launch_training

    job = small_job(export_uri, tiny, f"{s3_bucket}/killed", tmp_path / "work")
    monkeypatch.setenv(ENV_KILL_BEFORE_FINAL_MARKER, "1")
    with pytest.raises(TrainingFailed):
        launch_training(job, work_dir=tmp_path / "job", launcher="torchrun", processes=1)
    monkeypatch.delenv(ENV_KILL_BEFORE_FINAL_MARKER)
    assert storage.exists(f"{job.output_uri}/checkpoints/checkpoint-2/checkpoint.json")
    assert not storage.exists(f"{job.output_uri}/checkpoint.json")

    lines: list[str] = []
    rerun = launch_training(
        job, work_dir=tmp_path / "job", launcher="torchrun", processes=1, on_line=lines.append
    )
    assert rerun["steps"] == 2 and rerun["samples_seen"] == 0 and rerun["resumed_from_step"] == 2
    assert any("finishing from" in line and "nothing trained" in line for line in lines)
    final = storage.read_json(f"{job.output_uri}/checkpoint.json")
    assert final["final"] and final["step"] == 2 and final["config_hash"] == job.config_hash()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(final["files"])
    assert not any(f.startswith(("global_step", "optimizer", "trainer_state")) for f in final["files"])
    assert weights_hash(job.output_uri) == weights_hash(f"{job.output_uri}/checkpoints/checkpoint-2")
    again = launch_training(job, work_dir=tmp_path / "job", launcher="torchrun", processes=1)
    assert again["trained_already"] and again["steps"] == 2


def test_force_trains_other_settings_into_a_new_folder(tiny, export_uri, s3_bucket, tmp_path, capsys) -> None:
    """Through the command line: other settings than a finished training's are refused in one line
    naming them; with --force they are trained into a folder of their own, the old one untouched."""
    from cli import main
    from training.checkpoints import list_files

    job = small_job(export_uri, tiny, f"{s3_bucket}/trained", tmp_path / "work", zero_stage=0)
    _finished(job, 2)
    before = storage.read_json(f"{job.output_uri}/checkpoint.json"), list_files(job.output_uri)
    other = job.model_copy(update={"max_steps": 1, "learning_rate": 1e-3})
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump(other.model_dump(mode="json")))
    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {job.output_uri} holds a finished training")
    assert "(learning_rate 0.002 -> 0.001, max_steps 2 -> 1); nothing trained: force it" in err[0]
    assert main(["train", "--config", str(config), "--no-progress", "--force"]) == 0
    forced = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert forced["checkpoint_uri"] == f"{job.output_uri}-{other.config_hash()}" and forced["steps"] == 1
    marker = storage.read_json(f"{forced['checkpoint_uri']}/checkpoint.json")
    assert marker["config"]["learning_rate"] == 1e-3 and "model.safetensors" in marker["files"]
    # The old folder untouched.
    assert (storage.read_json(f"{job.output_uri}/checkpoint.json"), list_files(job.output_uri)) == before
    # A worker started by hand (python -m training.sft) on the finished folder trains nothing either.
    weights = weights_hash(forced["checkpoint_uri"])
    config.write_text(
        yaml.safe_dump(other.model_dump(mode="json") | {"output_uri": forced["checkpoint_uri"]})
    )
    again = run_sft(config)
    assert again["trained_already"] and again["steps"] == 1 and again["samples_seen"] == 0
    assert weights_hash(forced["checkpoint_uri"]) == weights


def test_kill_9_of_train_command_leaves_no_worker(tiny, export_uri, s3_bucket, tmp_path) -> None:
    import psutil

    job = small_job(
        export_uri,
        tiny,
        f"{s3_bucket}/cli-killed",
        tmp_path / "work",
        max_steps=100000,
        save_steps=None,
        logging_steps=100000,
    )
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "train", "--config", str(config), "--no-progress"],
        cwd=REPO,
        env=env | {"PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def command_lines(processes: list) -> str:
        lines = []
        for p in processes:
            try:
                lines.append(" ".join(p.cmdline()))
            except psutil.Error:  # exited meanwhile
                pass
        return " ".join(lines)

    # The first step logs its loss (then nothing for 100000 steps: a quiet job, as a real one is
    # between its logs, which a closed output pipe alone would not stop).
    job_processes: list = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if "'loss':" in line:
            job_processes = psutil.Process(proc.pid).children(recursive=True)
            break
    names = command_lines(job_processes)
    assert "torchrun" in names and "training.sft" in names, names
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    def alive() -> list[int]:
        running = []
        for p in job_processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    running.append(p.pid)
            except psutil.Error:
                pass
        return running

    deadline = time.time() + 30
    while alive() and time.time() < deadline:
        time.sleep(0.5)
    left = alive()
    for pid in left:  # never leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after kill -9 of the train command: {left}"


def test_train_flow_names_other_settings_and_forces_them_into_a_new_folder(tmp_path, prefect_harness) -> None:
    """The train form: settings other than the finished training's fail in one line naming them;
    ``force`` trains them into a folder of their own, registered as the run's checkpoint."""
    from flows.common import RunParams
    from flows.train import TrainParams, train_config, train_flow
    from octomed_data.recipe import load_recipe
    from octomed_data.runs import start_run

    demo = load_recipe("demo")
    recipe = demo.model_copy(update={"evaluation": demo.evaluation.model_copy(update={"enabled": False})})
    paths = start_run(recipe, "once", str(tmp_path / "store"))
    storage.Dataset(paths.trl_split(False, "train"), LLAMAFACTORY_SCHEMA).write_shard(0, training_rows(4))
    params = TrainParams(
        run=RunParams(run_id=paths.run_id, store=paths.store), launcher="torchrun", processes=1, max_steps=1
    )
    asked = train_config(recipe, paths, params)
    _finished(asked.model_copy(update={"learning_rate": asked.learning_rate * 2}), 1)  # trained before
    with pytest.raises(
        Exception, match=r"learning_rate 0\.0001 -> 5e-05\); nothing trained: force it"
    ) as exc:
        train_flow(params)
    assert "\n" not in str(exc.value)
    assert not storage.exists(f"{paths.checkpoints}-{asked.config_hash()}")

    out = train_flow(params.model_copy(update={"force": True}))
    forced = f"{paths.checkpoints}-{asked.config_hash()}"
    assert out["train"]["checkpoint_uri"] == forced and out["train"]["steps"] == 1
    assert out["checkpoint"]["checkpoint_uri"] == forced
    assert storage.read_json(paths.checkpoint_record)["checkpoint_uri"] == forced
    assert storage.read_json(f"{paths.checkpoints}/checkpoint.json")["config"]["learning_rate"] == 1e-4
    assert train_flow(params.model_copy(update={"force": True}))["skipped"]  # once
