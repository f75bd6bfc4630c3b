"""The recipe lab as a flow: the arms of an experiment spec trained and evaluated on one base run.

``experiment`` makes sure the base run is distilled and filtered (the factory's first four stages,
resumed when it exists), then runs each unfinished arm as its own ``experiment-arm`` subflow:
select (no teacher request) -> mixture -> export -> train -> evaluate, every arm from the same base
model with the same protocol and seeds. A failed arm does not stop the others; the comparison
report covers every finished arm, and the failed one is re-run alone (``arms: [name]``). Finished
arms (same settings, same data fingerprint) are reused. Arms whose training data (fingerprint) and
training settings are identical train once: the later ones evaluate the first one's checkpoint with
their own evaluation settings (``trained_by`` in ``arm.json``; the report lists who shared).

A spec's ``teachers`` each distil the base questions once (run ``<base_run>-<teacher>``, the recipe
with the teacher's overrides); an arm with ``teacher_run`` selects from that run and its record
carries the teacher's pass rate, reasoning length and cost. With ``evaluation.every_steps`` an arm
saves a checkpoint every N steps and evaluates each (its learning curve, ``curve`` in ``arm.json``).
An arm with ``rl: true`` then runs GRPO on its SFT checkpoint (``flows.experiment_rl``: once per
arm; an SFT twin shares the SFT training) and evaluates the RL checkpoint (``rl`` in ``arm.json``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.artifacts import replace_artifact
from flows.common import RunParams, artifact_key
from flows.train import TrainParams, eval_config, run_global, train_config, train_task
from octomed_data import storage
from octomed_data.errors import OctomedError
from octomed_data.experiment import ExperimentSpec, load_spec
from octomed_data.experiment.arms import ExperimentPaths, current, read_record, write_record
from octomed_data.experiment.compare import arm_metrics, compare
from octomed_data.experiment.report import learning_curves_png, report_markdown, report_png
from octomed_data.experiment.select import select_arm, teacher_summary
from octomed_data.experiment.stage import ArmStage
from octomed_data.job_config import EvalConfig
from octomed_data.layout import EvaluationFolder, RunPaths
from octomed_data.recipe import Recipe, load_recipe
from octomed_data.stages import describe_error
from octomed_data.stages.mixture import ExportStage, MixtureStage
from training.stage import TrainStage

BASE_STAGES = ["ingest", "decontaminate", "distill", "filter"]


class ExperimentParams(BaseModel):
    """The experiment form in the UI."""

    model_config = ConfigDict(extra="forbid")

    spec: str = Field(
        "sources",
        description="A ready-made spec (sources, samples, length, cot, difficulty, samples_vs_epochs, "
        "teacher, sft_vs_rl) or a spec YAML path.",
    )
    arms: list[str] | None = Field(None, description="Only these arms (e.g. a failed one); empty: every arm.")
    force: bool = Field(False, description="Re-run the chosen arms even when they are finished.")
    store: str | None = Field(
        None, description="Override the store (default: the spec's, else the recipe's)."
    )


class ArmsFailed(OctomedError):
    """Some arms failed; the others finished and are in the report."""


def _open(params: ExperimentParams) -> tuple[ExperimentSpec, Recipe, ExperimentPaths, RunPaths]:
    spec = load_spec(params.spec)
    recipe = load_recipe(spec.recipe)
    store = params.store or spec.store or os.environ.get("OCTOMED_STORE") or recipe.store
    for name in params.arms or []:
        spec.arm(name)  # an unknown arm is one error line, before anything runs
    return spec, recipe, ExperimentPaths(store, spec.name), RunPaths(store, spec.base_run)


def base_is_filtered(base: RunPaths) -> bool:
    return storage.exists(base.stats) and storage.Dataset(base.accepted).has_committed()


def _base_model(recipe: Recipe, exp: ExperimentPaths) -> str | None:
    """One base model for every arm: the recipe's, or one tiny model built once for the experiment."""
    model_path = recipe.training.config.model_path
    if model_path or not recipe.training.tiny_model:
        return model_path
    from training.tiny import ensure_model

    if "://" not in exp.store or exp.store.startswith("file://"):
        target = os.path.abspath(exp.tiny_model.removeprefix("file://"))
    else:  # models are local folders: a temp folder when the store is remote
        target = os.path.join(tempfile.gettempdir(), "octomed", "experiments", exp.name, "models", "tiny")
    return ensure_model(recipe.training.tiny_model, target)


@task(name="select-arm")
def select_task(base: RunPaths, spec: ExperimentSpec, arm_name: str, out: str) -> dict[str, Any]:
    return select_arm(base, spec.arm(arm_name), out).to_dict()


@task(name="mixture-arm")
def mixture_task(recipe: Recipe, base: RunPaths, arm: RunPaths) -> dict[str, Any]:
    """The arm's mixture: its traces come from the base run, so do the questions and the gold-label
    audit that may exclude some."""
    stage = MixtureStage(arm, recipe.mixture, questions=base.questions, audit=base.audit)
    return run_global(stage).counts


@task(name="export-arm")
def export_task(recipe: Recipe, arm: RunPaths, content: str = "reasoning") -> dict[str, Any]:
    """The arm's training export; ``answer_only``: each trace's answer line alone (direct answers)."""
    settings = recipe.export.model_dump() | {"content": content}
    return run_global(ExportStage(arm, settings)).counts


@task(name="evaluate-arm")
def evaluate_task(paths: RunPaths, config: EvalConfig) -> dict[str, Any]:
    """The arm's evaluation (done: its metrics of these settings on this checkpoint)."""
    from evaluation.stage import EvaluateStage

    return run_global(EvaluateStage(paths, config)).counts


@task(name="item-images")
def item_images_task(config: Any, exp: ExperimentPaths) -> str | None:
    """For registry benchmarks (whose predictions carry no image flag): question id -> has an image
    of the items evaluated, as a JSON object the comparison reads to group items by image presence.
    Read once per experiment and protocol (benchmarks, data folder, limit); None for a question
    dataset (the comparison reads its ``images`` column)."""
    if not config.benchmarks:
        return None
    from evaluation.benchmarks import LoadStats, get_benchmarks, iter_benchmark, resolve_data_dir
    from octomed_data.images import ImageStore

    blob = json.dumps([config.benchmarks, config.data_dir, config.limit], default=str)
    uri = exp.items(hashlib.sha256(blob.encode()).hexdigest()[:16])
    if storage.exists(uri):
        return uri
    data_dir = resolve_data_dir(config.data_dir)
    images: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="octomed-items-") as tmp:
        store = ImageStore(tmp)
        for spec in get_benchmarks(config.benchmarks):
            for row in iter_benchmark(spec, data_dir, store, LoadStats(), config.limit):
                images[row["question_id"]] = bool(row.get("images"))
    storage.write_json(uri, images)
    return uri


@task(name="learning-curve")
def curve_task(
    config: Any, checkpoint: str, train: dict[str, Any], paths: RunPaths, final_predictions: str
) -> list[dict[str, Any]]:
    """The arm's learning curve: every intermediate checkpoint of its training run evaluated with the
    arm's protocol (``evaluation/steps/<step>``), then the final one (already evaluated); one point
    per checkpoint: optimizer step, examples (sequences) trained on up to it, its predictions."""
    from evaluation.stage import EvaluateStage
    from training.checkpoints import intermediate_checkpoints, read_checkpoint_marker

    config_hash = read_checkpoint_marker(checkpoint).get("config_hash")
    points = []
    for step, uri, marker in intermediate_checkpoints(checkpoint, config_hash):
        if step >= int(train["steps"]):
            continue  # the final checkpoint is the last point
        out = EvaluationFolder(paths.evaluation).step(step)
        stage = EvaluateStage(paths, config.model_copy(update={"model": uri, "output_uri": out}))
        points.append(
            {"step": step, "examples": marker.get("samples_seen"), "checkpoint": uri}
            | {"predictions_uri": run_global(stage).counts["predictions_uri"]}
        )
    points.append(
        {"step": int(train["steps"]), "examples": train.get("samples_seen"), "checkpoint": checkpoint}
        | {"predictions_uri": final_predictions}
    )
    return points


def _train_params(spec: ExperimentSpec, arm_name: str, model_path: str | None) -> TrainParams:
    arm = spec.arm(arm_name)
    steps = arm.training.max_steps or (spec.training.max_steps if spec.control == "same_steps" else None)
    epochs = arm.training.num_train_epochs or (
        spec.training.num_train_epochs if spec.control == "same_epochs" else None
    )
    return TrainParams(
        model_path=arm.training.model_path or model_path,
        max_steps=steps,
        num_train_epochs=epochs,
        learning_rate=arm.training.learning_rate or spec.training.learning_rate,
        evaluate=False,
    )


def _eval_config(
    recipe: Recipe, spec: ExperimentSpec, arm_name: str, paths: RunPaths, base: RunPaths, checkpoint: str
) -> EvalConfig:
    """The arm's evaluation of ``checkpoint``: the recipe's protocol with the spec's and the arm's."""
    arm = spec.arm(arm_name)
    update: dict[str, Any] = {"seed": spec.evaluation.seed}
    for key in ("seeds", "limit"):
        if getattr(spec.evaluation, key) is not None:
            update[key] = getattr(spec.evaluation, key)
    if arm.evaluation.prompting:
        update["prompting"] = arm.evaluation.prompting
    if (update.get("prompting") or recipe.evaluation.config.prompting) == "direct":
        update["prefill_think"] = False  # direct: no reasoning, so no "<think>" opened for it
    benchmarks = arm.evaluation.benchmarks or spec.evaluation.benchmarks or recipe.evaluation.benchmarks
    # Without benchmarks: the base run's questions decontamination removed (the arm has none of its own).
    questions = recipe.evaluation.questions or base.removed
    block = recipe.evaluation.model_copy(
        update={
            "config": recipe.evaluation.config.model_copy(update=update),
            "benchmarks": benchmarks,
            "questions": questions,
        }
    )
    return eval_config(recipe.model_copy(update={"evaluation": block}), paths, checkpoint)


def recipe_settings(recipe: Recipe, model_path: str | None) -> dict[str, Any]:
    """What of the recipe an arm's result depends on (part of its settings fingerprint)."""
    return {
        "training": recipe.training.model_dump(mode="json"),
        "mixture": recipe.mixture.model_dump(mode="json"),
        "export": recipe.export.model_dump(mode="json"),
        "evaluation": recipe.evaluation.model_dump(mode="json"),
        "model": model_path,
    }


def arm_recipe_settings(recipe: Recipe, model_path: str | None, arm: Any) -> dict[str, Any]:
    """``recipe_settings``, plus the ``rl:`` and ``verify:`` settings for an arm with RL."""
    if not arm.rl:
        return recipe_settings(recipe, model_path)
    from flows.experiment_rl import rl_settings

    return recipe_settings(recipe, model_path) | rl_settings(recipe)


def training_key(spec: ExperimentSpec, arm_name: str, settings: dict[str, Any], data_fingerprint: str) -> str:
    """What decides an arm's checkpoint: its data fingerprint and every training setting (the arm's
    training overrides, control, the spec's training, the recipe's training, mixture and export
    settings, the base model); never its evaluation settings."""
    arm = spec.arm(arm_name)
    blob = {
        "data": data_fingerprint,
        "arm_training": arm.training.model_dump(mode="json"),
        "control": spec.control,
        "training": spec.training.model_dump(mode="json"),
        "base_run": spec.base_run,
        "recipe": {k: settings.get(k) for k in ("training", "mixture", "export", "model")},
    }
    if spec.every_steps(arm):  # intermediate checkpoints saved for a learning curve
        blob["every_steps"] = spec.every_steps(arm)
    text = json.dumps(blob, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trained_twin(spec: ExperimentSpec, exp: ExperimentPaths, arm: str, key: str) -> str | None:
    """Another arm of the spec that trained (itself) a finished checkpoint under ``key``, if any."""
    for other in spec.arms:
        if other.name == arm:
            continue
        rec = read_record(exp, other.name)
        if rec.get("train_key") != key or not rec.get("train") or rec.get("trained_by") != other.name:
            continue
        if storage.exists(exp.arm(other.name).checkpoint_marker):
            return other.name
    return None


@flow(name="experiment-arm", flow_run_name="arm {arm}", log_prints=True)
def arm_flow(spec_ref: str, arm: str, store: str | None = None, force: bool = False) -> dict[str, Any]:
    """One arm: select -> mixture -> export -> train -> evaluate; reused when finished (``ArmStage``)."""
    spec, recipe, exp, base = _open(ExperimentParams(spec=spec_ref, store=store))
    arm_cfg = spec.arm(arm)
    base = RunPaths(exp.store, spec.base_run_of(arm_cfg))  # its teacher's distillation, if it names one
    model_path = _base_model(recipe, exp)
    settings = spec.settings_fingerprint(arm_cfg, arm_recipe_settings(recipe, model_path, arm_cfg))
    record: dict[str, Any] = {"status": "RUNNING", "settings": settings}
    record["spec"] = spec.arm_settings(arm_cfg, arm_recipe_settings(recipe, model_path, arm_cfg))
    try:
        data = select_task(base, spec, arm, exp.arm(arm).accepted)  # no teacher request: cheap
    except Exception as exc:
        write_record(exp, arm, record | {"status": "FAILED", "error": describe_error(exc)})
        raise

    def job() -> dict[str, Any]:
        try:
            _run_arm(spec, recipe, exp, base, arm, model_path, data, record, force)
        except Exception as exc:
            record.update(status="FAILED", error=describe_error(exc))
            write_record(exp, arm, record)
            raise
        return write_record(exp, arm, record | {"status": "COMPLETED"})

    outcome = run_global(ArmStage(exp, arm, settings, data["fingerprint"], job, rerun=force))
    if outcome.state == "REUSED":
        print(f"arm {arm}: finished before with these settings and data ({data['fingerprint']}), reused")
    return outcome.counts


def _run_arm(
    spec: ExperimentSpec,
    recipe: Recipe,
    exp: ExperimentPaths,
    base: RunPaths,
    arm: str,
    model_path: str | None,
    data: dict[str, Any],
    record: dict[str, Any],
    force: bool,
) -> None:
    """The arm's mixture, export, training (or its twin's checkpoint) and evaluation, into ``record``."""
    arm_cfg, paths = spec.arm(arm), exp.arm(arm)
    if arm_cfg.rl:  # a reward the GRPO job cannot compute is one line before anything trains
        from training.rl_stage import check_rewards

        check_rewards(recipe)
    key = training_key(spec, arm, recipe_settings(recipe, model_path), data["fingerprint"])
    record["train_key"] = key
    write_record(exp, arm, record)
    record["data"] = data
    if arm_cfg.teacher_run is not None:
        record["teacher"] = {"name": arm_cfg.teacher_run} | teacher_summary(base)
    print(f"arm {arm}: {data['traces']} traces, data {data['fingerprint']}")
    twin = None if force else trained_twin(spec, exp, arm, key)
    if twin is not None:
        # Same data, same training: the twin's checkpoint, evaluated with this arm's settings.
        shared = read_record(exp, twin)
        record |= {"mixture": shared.get("mixture", {}), "train": shared["train"], "trained_by": twin}
        for k in ("tensorboard",):
            if k in shared:
                record[k] = shared[k]
        checkpoint = exp.arm(twin).checkpoints
        print(f"arm {arm}: same data and training as arm {twin}: its checkpoint, not trained again")
    else:
        mix = mixture_task(recipe, base, paths)
        record["mixture"] = {
            "train_rows": mix["rows_train"],
            "validation_rows": mix["rows_validation"],
            "questions_train": mix["questions_train"],
        }
        export_task(recipe, paths, arm_cfg.export)
        config = train_config(recipe, paths, _train_params(spec, arm, model_path))
        update: dict[str, Any] = {"report_to": spec.training.report_to}
        if spec.control == "same_epochs" and arm_cfg.training.max_steps is None:
            update["max_steps"] = None  # epochs decide, not a max_steps the recipe carries
        if arm_cfg.training.seed is not None:
            update["seed"] = arm_cfg.training.seed
        every = spec.every_steps(arm_cfg)
        if every:  # learning curve: a checkpoint every N steps, each kept in the store
            update["save_steps"] = every
        tensorboard = os.path.join(config.work_dir or tempfile.gettempdir(), "tensorboard")
        config = config.model_copy(update=update | {"logging_dir": tensorboard})
        if spec.training.report_to == "tensorboard":
            record["tensorboard"] = tensorboard  # `tensorboard --logdir` it
        job = TrainStage(
            paths,
            lambda c=config: train_task(_fresh(c) if force else c, recipe.training.launcher, None, None),
            rerun=force,
            config_hash=f"{config.config_hash()}-{config.save_steps}",  # + the learning curve's checkpoints
        )
        record["train"] = run_global(job).counts
        record["trained_by"] = arm
        write_record(exp, arm, record)  # its checkpoint is findable by twins from here on
        checkpoint = paths.checkpoints
    if arm_cfg.rl:  # GRPO on the SFT checkpoint, once; the RL checkpoint is what the arm evaluates
        from flows.experiment_rl import rl_arm

        record["rl"] = rl_arm(spec, recipe, exp, base, arm, checkpoint, force)
        write_record(exp, arm, record)
        checkpoint = record["rl"]["checkpoint"]
    eval_cfg = _eval_config(recipe, spec, arm, paths, base, checkpoint)
    result = evaluate_task(paths, eval_cfg)
    record["evaluation"] = {
        "predictions_uri": result["predictions_uri"],
        "report_uri": result["report_uri"],
        "questions_uri": None if eval_cfg.benchmarks else eval_cfg.questions_uri,  # item groups
        "item_images": item_images_task(eval_cfg, exp),  # registry benchmarks: item groups
        "checkpoint": checkpoint,
    }
    record["metrics"] = arm_metrics(result["predictions_uri"])
    if spec.every_steps(arm_cfg):
        record["curve"] = curve_task(eval_cfg, checkpoint, record["train"], paths, result["predictions_uri"])


@task(name="comparison-report")
def report_task(spec: ExperimentSpec, exp: ExperimentPaths, recipe: Recipe) -> dict[str, Any]:
    """The comparison of the arms finished with the current settings (others show their state)."""
    model_path = _base_model(recipe, exp)
    records = {
        a.name: current(
            read_record(exp, a.name),
            spec.settings_fingerprint(a, arm_recipe_settings(recipe, model_path, a)),
        )
        for a in spec.arms
    }
    result = compare(spec, records)
    storage.write_json(exp.comparison, result)
    markdown = report_markdown(result)
    png = report_png(result)
    storage.write_bytes(exp.report, markdown.encode("utf-8"))
    storage.write_bytes(exp.plot, png)
    curves = learning_curves_png(result)
    if curves is not None:
        storage.write_bytes(exp.curves_plot, curves)
    inline = markdown.replace(
        "](comparison.png)", f"](data:image/png;base64,{base64.b64encode(png).decode()})"
    )
    if curves is not None:
        inline = inline.replace(
            "](learning_curves.png)", f"](data:image/png;base64,{base64.b64encode(curves).decode()})"
        )
    key = artifact_key("experiment", spec.name)
    replace_artifact(  # a pass replaces the card, never appends a version (issue 26)
        key,
        lambda: create_markdown_artifact(
            inline, key=key, description=f"Experiment {spec.name}: arms compared"
        ),
    )
    plots = {"curves_plot": exp.curves_plot} if curves is not None else {}
    return {"report": exp.report, "plot": exp.plot, "comparison": exp.comparison} | plots | result


def _fresh(config: Any) -> Any:
    """``--force`` trains the arm again from step 0: a job finds a finished training of the same
    settings and trains nothing (training is exactly once, ``training/once.py``), so un-finish it
    and start without resuming."""
    from training.run_checkpoints import remove_final_marker

    remove_final_marker(config.output_uri)
    return config.model_copy(update={"resume": False})


def teacher_base(spec: ExperimentSpec, exp: ExperimentPaths, name: str) -> RunPaths:
    """A teacher's own distillation of the base questions (run ``<base_run>-<name>``): the recipe
    with the teacher's overrides, recorded in the run's ``run.json`` when it starts (a resumed run
    keeps it), then the factory's first four stages once."""
    from flows.factory import factory_flow
    from octomed_data.runs import start_run

    run_id = f"{spec.base_run}-{name}"
    paths = RunPaths(exp.store, run_id)
    if base_is_filtered(paths):
        return paths
    print(f"teacher {name}: distilling and filtering the base questions once as run {run_id}")
    start_run(load_recipe(spec.recipe, overrides=spec.teacher(name).overrides), run_id, exp.store)
    factory_flow(RunParams(recipe_path=spec.recipe, run_id=run_id, store=exp.store), stages=BASE_STAGES)
    return paths


@flow(name="experiment", log_prints=True)
def experiment_flow(params: ExperimentParams = ExperimentParams()) -> dict[str, Any]:
    """Run an experiment spec: the base run once, every (or the chosen) arm, the comparison report."""
    from flows.factory import factory_flow

    spec, recipe, exp, base = _open(params)
    logger = get_run_logger()
    storage.write_json(exp.spec_json, spec.model_dump(mode="json"))
    chosen = [spec.arm(a) for a in params.arms or [a.name for a in spec.arms]]
    if any(a.teacher_run is None for a in chosen) and not base_is_filtered(base):
        print(f"base run {spec.base_run}: distilling and filtering it once (the arms reuse it)")
        factory_flow(
            RunParams(recipe_path=spec.recipe, run_id=spec.base_run, store=exp.store), stages=BASE_STAGES
        )
    for name in dict.fromkeys(a.teacher_run for a in chosen if a.teacher_run is not None):
        teacher_base(spec, exp, name)
    failed: dict[str, str] = {}
    for arm in params.arms or [a.name for a in spec.arms]:
        try:
            arm_flow(params.spec, arm, exp.store, params.force)
        except Exception as exc:  # the other arms go on; the report shows which failed
            failed[arm] = describe_error(exc)
            logger.error("arm %s failed: %s", arm, failed[arm])
    out = report_task(spec, exp, recipe)
    print(f"experiment {spec.name}: report {exp.report}")
    if failed:
        names = ", ".join(sorted(failed))
        raise ArmsFailed(
            f"arm(s) {names} failed ({'; '.join(f'{k}: {v}' for k, v in failed.items())}); the report covers "
            f"the others. Re-run them alone: octomed-data experiment {params.spec} --arm "
            + " --arm ".join(sorted(failed))
        )
    return out
