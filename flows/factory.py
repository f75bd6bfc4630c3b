"""The factory: ingest -> decontaminate -> distill -> filter -> mixture -> export (-> release) -> train ->
checkpoint -> evaluate, each stage its own flow, driven by one recipe file.

Re-running the factory with the same ``run_id`` resumes it: a shard whose committed marker says
done is reused, everything else runs. ``verify`` replaces the run's verifier settings: every filter
shard is judged again from the stored replies (no distillation request). With ``shards`` set, per-shard stages re-run exactly those
shards (the filter stage also judges any shard not judged yet) and the global stages (mixture,
export, report) are rebuilt from all committed shards, so the outputs end as if nothing had failed.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import Field

from flows.common import (
    RunParams,
    ShardFailures,
    apply_verify,
    prepare,
    publish_artifact_index,
    publish_shard_table,
)
from flows.decontaminate import decontaminate_flow
from flows.distill import distill_flow
from flows.export import export_flow
from flows.filter import VERIFY_HELP, filter_flow, report_task
from flows.ingest import ingest_flow
from flows.mixture import mixture_flow
from flows.naming import run_name
from flows.release import release_flow
from flows.train import TrainParams, checkpoint_flow, evaluate_flow, train_flow
from octomed_data.layout import STAGES
from octomed_data.verify import VerifySettings

Stage = Literal[STAGES]  # the stage names, as layout.STAGES lists them


def training_left_to_automation(automation_on: bool, exported: bool) -> bool:
    """Whether the automation starts training for this run instead of the factory.

    Only when this pass committed an export (what the automation fires on) and the automation
    really exists on the API server, however the factory was started (deployment, ``run``,
    ``rerun``, UI). Otherwise (``serve --no-automation``, no server) the factory trains itself.
    Either way training runs once per (run, export): a second trigger is a no-op.
    """
    from flows.automation import automation_active

    return automation_on and exported and automation_active()


@flow(name="factory", flow_run_name=run_name, log_prints=True)
def factory_flow(
    run: RunParams = RunParams(),
    stages: list[Stage] | None = None,
    verify: VerifySettings | None = Field(None, description=VERIFY_HELP),
) -> dict[str, Any]:
    """Run the whole factory (or the named stages) for one run of a recipe.

    ``verify``: new verifier settings for the run (``run.json`` records them); its filter stage
    then judges every shard again from the stored replies, and mixture and export follow."""
    recipe, paths = prepare(run)
    recipe = apply_verify(paths, recipe, verify, by="factory flow")
    run = run.model_copy(update={"run_id": paths.run_id, "store": paths.store})
    todo = [s for s in STAGES if stages is None or s in stages]
    logger = get_run_logger()
    print(f"run {paths.run_id}: {paths.root}")
    out: dict[str, Any] = {"run_id": paths.run_id, "root": paths.root}
    try:
        if "ingest" in todo:
            out["ingest"] = ingest_flow(run.model_copy(update={"shards": None}))
        if "decontaminate" in todo:
            out["decontaminate"] = decontaminate_flow(run)
        if "distill" in todo:  # at most distill.max_concurrent_shards shards at once (the flow bounds it)
            out["distill"] = distill_flow(run)
        if "filter" in todo:
            out["filter"] = filter_flow(run)
        if "mixture" in todo:
            out["mixture"] = mixture_flow(run)
        if "export" in todo:
            out["export"] = export_flow(run)
            if recipe.release.enabled:  # published right after the export it matches
                out["release"] = release_flow(run.model_copy(update={"shards": None}))
        wants_training = any(s in todo for s in ("train", "checkpoint", "evaluate"))
        if wants_training and recipe.training.enabled:
            if training_left_to_automation(recipe.automation.train_on_mixture, "export" in out):
                print(
                    "training: left to the automation that runs the `train` deployment on export completion"
                )
            elif "train" in todo:
                evaluate = "evaluate" in todo or "checkpoint" in todo
                out["train"] = train_flow(TrainParams(run=run, evaluate=evaluate))
            else:  # checkpoint / evaluate of an earlier training
                if "checkpoint" in todo:
                    out["checkpoint"] = checkpoint_flow(run)
                if "evaluate" in todo and recipe.evaluation.enabled:
                    out["evaluate"] = evaluate_flow(run)
        elif wants_training:
            print("training: disabled in the recipe")
    except ShardFailures:
        # The report still shows which shards failed and what the others produced.
        report_task(paths)
        publish_shard_table(paths)
        publish_artifact_index(paths)
        raise
    out["report"] = report_task(paths)
    publish_shard_table(paths)
    out["artifacts"] = publish_artifact_index(paths)  # the factory run links every stage's artifacts
    logger.info("factory run %s finished", paths.run_id)
    return out
