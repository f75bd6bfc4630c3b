"""Train, checkpoint and evaluate flows: SFT on the TRL export, register the checkpoint, score it.

The ``train`` deployment is what the dashboard's "Run" form and the mixture automation start.
These flows call Helper E's ``training`` package; where a piece of it is not installed they fail
with a message naming what is missing, never pretending a model was trained.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import tempfile
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.common import ENV_STORE, RunParams, prepare, publish_markdown, publish_table
from octomed_data import storage
from octomed_data.errors import ConfigError, OctomedError, StorageError
from octomed_data.job_config import EvalConfig, TrainConfig
from octomed_data.layout import RunPaths
from octomed_data.recipe import Recipe, load_recipe
from octomed_data.stages import (
    GLOBAL_SHARD,
    LocalExecutor,
    ShardOutcome,
    Stage,
    raise_for_failures,
    run_stage,
)


class TrainingUnavailable(OctomedError):
    """The training entry point this flow needs is not part of this install."""


def _training_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name.split(".")[0]):
            raise TrainingUnavailable(
                f"{name} is not available in this install ({exc}); nothing was trained"
            ) from None
        raise


class TrainRunParams(RunParams):
    """The run to train: an existing one (training never starts a run)."""

    run_id: str | None = Field(
        None, description="Required: the existing run whose export to train on (training never starts a run)."
    )


class TrainParams(BaseModel):
    """The training form in the UI: the run whose export to train on, plus the common knobs."""

    model_config = ConfigDict(extra="forbid")

    run: TrainRunParams = Field(default_factory=TrainRunParams)
    model_path: str | None = Field(None, description="Local model folder; empty: the recipe's setting.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float | None = Field(None, gt=0)
    num_train_epochs: float | None = Field(None, gt=0)
    launcher: Literal["auto", "inprocess", "torchrun", "deepspeed", "ray"] | None = Field(
        None,
        description="auto = torchrun on this node; ray = Ray Train across the cluster. Empty: the recipe's.",
    )
    processes: int | None = Field(
        None, ge=1, description="Processes per node (Ray: workers). Empty: one per GPU."
    )
    evaluate: bool = Field(True, description="Register the checkpoint and evaluate it afterwards.")
    force: bool = Field(
        False,
        description="The run's checkpoint is trained with other settings: train these into a new folder "
        "beside it (the old model is kept). Off: such a job is refused, naming the settings that differ. "
        "The same settings train nothing; a larger max_steps extends the finished training.",
    )

    @field_validator("run", mode="before")
    @classmethod
    def _run(cls, v: Any) -> Any:
        """A plain :class:`RunParams` (what the deployments and the automation hand over) is accepted."""
        return v.model_dump() if isinstance(v, RunParams) else v


def local_dir(paths: RunPaths, name: str) -> str:
    """A local folder for things that must be local (models): under the run for file stores."""
    if "://" not in paths.store or paths.store.startswith("file://"):
        path = os.path.abspath(paths.local(name).removeprefix("file://"))
    else:
        # Keyed by the run's root, not its id alone: experiment arms share names (``all``) across specs.
        digest = hashlib.sha256(paths.root.encode()).hexdigest()[:10]
        path = os.path.join(tempfile.gettempdir(), "octomed", f"{paths.run_id}-{digest}", name)
    os.makedirs(path, exist_ok=True)
    return path


def train_config(recipe: Recipe, paths: RunPaths, params: TrainParams) -> TrainConfig:
    """The TrainConfig for this run: recipe settings, run locations, then the form's overrides."""
    options = recipe.training.config
    model_path = params.model_path or options.model_path
    if model_path is None and recipe.training.tiny_model:
        target = local_dir(paths, paths.tiny_model(recipe.training.tiny_model))
        model_path = _training_module("training.tiny").ensure_model(recipe.training.tiny_model, target)
    if model_path is None:
        raise ConfigError("no model to train: set training.config.model_path in the recipe or the form")
    # The TRL export's "text" configuration (text rows) for a text-only model, "vision" (every row)
    # otherwise; a model that is not a local folder yet (hub id, checkpoint URI) gets "vision".
    config_file = os.path.join(str(model_path), "config.json")
    text_only = os.path.isfile(config_file) and not _training_module("training.models").is_vision_model(
        model_path
    )
    export_uri = paths.trl_split(text_only, "train")
    files = storage.Dataset(export_uri).files()
    if not files:
        raise StorageError(f"no TRL export at {export_uri}: run the export flow first")
    overrides = {k: getattr(params, k) for k in ("max_steps", "learning_rate", "num_train_epochs")}
    return options.job(
        files,
        paths.checkpoints,
        model_path=model_path,
        work_dir=options.work_dir or local_dir(paths, "train-work"),
        **{k: v for k, v in overrides.items() if v is not None},
    )


@task(name="train", retries=0)
def train_task(config: Any, launcher: str, processes: int | None, ray_address: str | None) -> dict[str, Any]:
    """One SFT job: ``torchrun``/``deepspeed`` on this node, or Ray Train workers across a cluster.

    Long and stateful, so no automatic retry: a re-run resumes from the last uploaded checkpoint.
    """
    logger = get_run_logger()
    if launcher == "ray":
        # Workers and GPU use come from the cluster's resources, not from this (flow) machine.
        ray_train = _training_module("tasks.ray_train")
        return ray_train.train_on_ray(config, num_workers=processes, address=ray_address)
    launch = _training_module("training.launch")
    return launch.launch_training(
        config,
        work_dir=os.path.join(config.work_dir, "job"),
        launcher=launcher,
        processes=processes,
        on_line=logger.info,
    )


@task(name="register-checkpoint", retries=2)
def checkpoint_task(paths: RunPaths, uri: str | None = None) -> dict[str, Any]:
    """Verify the uploaded checkpoint (default: the run's ``checkpoints``; a forced job's folder
    beside it) and record it as this run's (and the store's latest) model."""
    checkpoints = _training_module("training.checkpoints")
    uri = uri or paths.checkpoints
    marker = checkpoints.read_checkpoint_marker(uri)
    record = {"run_id": paths.run_id, "checkpoint_uri": uri, "marker": marker}
    storage.write_json(paths.checkpoint_record, record)
    storage.write_json(paths.latest_checkpoint, record)
    return record


@task(name="evaluate", retries=0)
def evaluate_task(paths: RunPaths, config: EvalConfig) -> dict[str, Any]:
    """The benchmark harness on the run's checkpoint (long: no automatic retry; re-run the flow);
    done when its metrics are of these settings on this checkpoint (``evaluation.stage``)."""
    return run_global(_training_module("evaluation.stage").EvaluateStage(paths, config)).counts


def run_global(stage: Stage) -> ShardOutcome:
    """A global stage (training, evaluation) run by ``run_stage`` in this process: its one outcome
    (REUSED when its done-signal holds). A failure is one error line."""
    result = run_stage(stage, LocalExecutor(progress=False))
    raise_for_failures(result)
    return result.outcomes[GLOBAL_SHARD]


def eval_config(recipe: Recipe, paths: RunPaths, checkpoint: str | None = None) -> EvalConfig:
    """The EvalConfig for this run: its checkpoint (or ``checkpoint``) on the recipe's benchmarks
    (or question dataset)."""
    block = recipe.evaluation
    if block.benchmarks:
        data_dir = recipe.resolve_path(block.data_dir) if block.data_dir else None
        inputs: dict[str, Any] = {"benchmarks": list(block.benchmarks), "data_dir": data_dir}
    else:
        questions = block.questions or paths.removed
        if not storage.Dataset(questions).has_committed():
            raise StorageError(f"no evaluation questions at {questions}")
        inputs = {"questions_uri": questions}
    # The tiny demo model is text-only or VL as built; a work folder under the run keeps downloads local.
    work_dir = block.config.work_dir or local_dir(paths, "eval-work")
    return block.config.job(
        checkpoint or paths.checkpoints, output_uri=paths.evaluation, work_dir=work_dir, **inputs
    )


@flow(name="checkpoint", log_prints=True)
def checkpoint_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """Register the run's finished checkpoint (checks its ``checkpoint.json`` marker)."""
    _, paths = prepare(run)
    record = checkpoint_task(paths)
    print(f"checkpoint: {record['checkpoint_uri']}")
    return record


@flow(name="evaluate", log_prints=True)
def evaluate_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """Evaluate the run's checkpoint on the recipe's held-out benchmarks; publish the table and the plot."""
    recipe, paths = prepare(run)
    result = evaluate_task(paths, eval_config(recipe, paths))
    rows = [
        {"benchmark": name}
        | {k: v for k, v in m.items() if k in _TABLE_COLUMNS}
        | {"skipped_by_reason": ", ".join(f"{r}: {n}" for r, n in (m.get("skipped_by_reason") or {}).items())}
        for name, m in result["per_benchmark"].items()
    ]
    publish_table("evaluation", paths, rows, f"Evaluation per benchmark, run {paths.run_id}")
    report = storage.read_bytes(result["report_uri"]).decode("utf-8")
    # The PNG travels inside the markdown (a data URL) so the artifact shows it without the store.
    png = base64.b64encode(storage.read_bytes(result["plot_uri"])).decode("ascii")
    report = report.replace("](reasoning_length.png)", f"](data:image/png;base64,{png})")
    publish_markdown("evaluation-report", paths, report, f"Evaluation report, run {paths.run_id}")
    print(
        f"evaluate: macro accuracy {result['macro_accuracy']} on {result['items']} item(s) "
        f"x seeds = {result['predictions']} prediction(s) -> {result['output_uri']}"
    )
    return result


_TABLE_COLUMNS = (
    "items",
    "skipped",
    "accuracy_mean",
    "accuracy_std",
    "parse_failure_rate",
    "request_errors",
    "token_f1_mean",
    "reasoning_tokens_mean",
    "forced_end",
    "paper_octomed_7b",
)


def existing_run(run: RunParams) -> RunPaths:
    """The run to train: it must exist already (training never starts a run). Creates nothing."""
    if not run.run_id:
        raise ConfigError("train needs run.run_id: the run whose export to train on (nothing was created)")
    store = run.store or os.environ.get(ENV_STORE) or load_recipe(run.recipe_path).store
    paths = RunPaths(store, run.run_id)
    if not storage.exists(paths.run_json):
        raise ConfigError(
            f"no run {run.run_id!r} under {paths.store}: nothing to train (nothing was created)"
        )
    return paths


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


@flow(name="train", log_prints=True)
def train_flow(params: TrainParams = TrainParams()) -> dict[str, Any]:
    """SFT on the run's TRL export, then (by default) register and evaluate the checkpoint.

    Exactly once per (run, export, settings): the training stage (``training.stage.TrainStage``,
    run by ``run_stage``) is done when the export's training record says COMPLETED for the settings
    asked for (:func:`form_hash`); a trigger for an export being trained by another job is a no-op,
    and one lease keeps two jobs out of one checkpoint folder. Other settings reach the job, which
    extends a finished training for a larger ``max_steps`` and refuses anything else in one line
    naming it unless ``force`` (then a folder of its own: :mod:`training.once`).
    """
    found = existing_run(params.run)  # refuse in one line before anything is created
    # The export's fingerprint (or one ConfigError line) before the run is opened; the job runs
    # with the recipe and paths the run was opened with (bound below, before the stage runs).
    stage_module = _training_module("training.stage")
    stage = stage_module.TrainStage(
        found, lambda: _train(recipe, paths, params), owner=_flow_run_id() or None
    )
    run_params = RunParams(recipe_path=params.run.recipe_path, run_id=found.run_id, store=found.store)
    recipe, paths = prepare(run_params)
    # A trigger for the export another job trains right now is a no-op (not a wait for its lease).
    other = stage.trained_elsewhere()
    if other:
        print(
            f"training: another job ({other}) trains export {stage.export} of run {paths.run_id}; nothing to do"
        )
        return {"run_id": paths.run_id, "key": stage.key, "skipped": True}
    # Done: this export trained with these settings (the recipe's, the form's). Other settings reach
    # the job, which trains each settings exactly once (training.once): a larger max_steps extends
    # the finished training, other settings are refused in one line naming them unless forced.
    stage.config_hash = form_hash(recipe, params)
    outcome = run_global(stage)
    if (
        outcome.state == "REUSED"
        or outcome.counts.get(stage_module.ALREADY)
        or (
            outcome.counts.get("trained_already")
            and outcome.counts.get("checkpoint_uri") == _registered(paths)
        )
    ):
        print(
            f"training: export {stage.export} of run {paths.run_id} is trained with these settings "
            "(or training) already; nothing to train"
        )
        return {"run_id": paths.run_id, "key": stage.key, "skipped": True}
    return _after_training(recipe, paths, params, outcome.counts)


def form_hash(recipe: Recipe, params: TrainParams) -> str:
    """The settings a train trigger asks for (the run's recipe's, then the form's), without the
    export or the model folder: what the training record of an export is done for."""
    asked = recipe.training.config.model_dump(mode="json") | {
        k: getattr(params, k) for k in ("model_path", "max_steps", "learning_rate", "num_train_epochs")
    }
    return hashlib.sha256(json.dumps(asked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def routed_config(recipe: Recipe, paths: RunPaths, params: TrainParams) -> tuple[TrainConfig, str]:
    """The job's config (in a folder of its own when forced) and one line saying what it will do."""
    config = train_config(recipe, paths, params)
    files = _training_module("training.data").resolve_data_files(config.train_data)
    manifest = [{"uri": f.uri, "rows": f.rows} for f in files]
    return _training_module("training.once").route_output(config, manifest, force=params.force)


def _registered(paths: RunPaths) -> str | None:
    """The checkpoint registered as the run's, if any."""
    record = storage.read_json(paths.checkpoint_record) if storage.exists(paths.checkpoint_record) else {}
    return record.get("checkpoint_uri")


def _train(recipe: Recipe, paths: RunPaths, params: TrainParams) -> dict[str, Any]:
    """The job, under the checkpoint folder's lease: routed again (what it finds there now)."""
    config, what = routed_config(recipe, paths, params)
    print(f"training: {what}")
    return train_task(
        config,
        params.launcher or recipe.training.launcher,
        params.processes or recipe.training.processes,
        recipe.training.ray_address,
    )


def _after_training(
    recipe: Recipe, paths: RunPaths, params: TrainParams, result: dict[str, Any]
) -> dict[str, Any]:
    publish_markdown(
        "training",
        paths,
        "\n".join(
            [f"# Training, run `{paths.run_id}`", ""]
            + [f"- **{k}**: {v}" for k, v in result.items() if not isinstance(v, dict)]
            + (
                ["", "_Tiny random model (demo): a pipeline check, not a trained medical model._"]
                if recipe.training.tiny_model and not params.model_path
                else []
            )
        ),
        f"Training run {paths.run_id}",
    )
    print(f"train: checkpoint at {result.get('checkpoint_uri')}")
    out = {"run_id": paths.run_id, "train": result}
    if params.evaluate:
        uri = result.get("checkpoint_uri") or paths.checkpoints
        if uri == paths.checkpoints:
            run = RunParams(recipe_path=params.run.recipe_path, run_id=paths.run_id, store=paths.store)
            out["checkpoint"] = checkpoint_flow(run)
            if recipe.evaluation.enabled:
                out["evaluate"] = evaluate_flow(run)
        else:  # a forced job's own folder
            out["checkpoint"] = checkpoint_task(paths, uri)
            if recipe.evaluation.enabled:
                out["evaluate"] = evaluate_task(paths, eval_config(recipe, paths, uri))
    return out
