"""What every flow shares: typed run parameters, opening the run, running a stage, artifacts.

A flow composes stages (:mod:`octomed_data.stages`) and publishes artifacts; it holds no stage
logic. :func:`run_stage_flow` is the one way a flow runs a stage: the Prefect executor (one task
per shard, named ``<stage> <shard>``), a progress artifact updated per shard, one shard table per
stage when it ends (artifact data grows with the shards, not with their square), and one error line
naming the shards that failed and how to re-run them. The cards themselves (replaced on every pass,
summarised for big runs) are :mod:`flows.artifacts`; the run id of a flow run started without one
(a Retry resumes it) and flow run names are :mod:`flows.naming`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows.artifacts import (  # the dashboard's cards live in flows/artifacts.py; importable from here
    artifact_index_markdown as artifact_index_markdown,
)
from flows.artifacts import artifact_key as artifact_key
from flows.artifacts import new_progress_artifact
from flows.artifacts import publish_artifact_index as publish_artifact_index
from flows.artifacts import publish_markdown as publish_markdown
from flows.artifacts import publish_shard_table as publish_shard_table
from flows.artifacts import publish_table as publish_table
from flows.artifacts import published as published
from flows.artifacts import remember as remember
from flows.naming import derived_run_id, label_flow_run
from octomed_data import storage
from octomed_data.layout import ENV_STORE as ENV_STORE  # flows/train imports it from here
from octomed_data.layout import RunPaths, default_store
from octomed_data.recipe import Recipe, load_recipe
from octomed_data.runs import open_run, start_run
from octomed_data.stages import Stage, StageFailed, StageResult, raise_for_failures, run_stage

LIBRARY_LOGGER = "octomed_data"


def forward_library_logs() -> None:
    """Send the library's log lines (retries and backoff, outage budget, batch states, fleet
    replicas) to the Prefect API, so they show in the task run's logs in the UI. Prefect forwards
    only its own loggers (and ``PREFECT_LOGGING_EXTRA_LOGGERS``, read before any flow module loads);
    this does the same for ``octomed_data`` from here. Idempotent."""
    import logging

    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


forward_library_logs()
ShardFailures = StageFailed  # some shards failed; the others are committed: re-run the failed ones alone


class RunParams(BaseModel):
    """Which run a flow works on. The UI renders this as the flow's parameter form."""

    model_config = ConfigDict(extra="forbid")

    recipe_path: str = Field("demo", description="Recipe YAML path, or 'demo' for the embedded demo recipe.")
    run_id: str | None = Field(
        None,
        description="The run to work on. Empty: the factory (and ingest) start a new run, named after "
        "this flow run, which a Retry of it continues; train, checkpoint, evaluate and the later "
        "stages need an existing run's id.",
    )
    store: str | None = Field(None, description="Override the recipe's store URI (file path or s3://...).")
    shards: list[str] | None = Field(
        None, description="Only these shards (names or numbers) in per-shard stages; empty = all."
    )


def prepare(run: RunParams) -> tuple[Recipe, RunPaths]:
    """Open the run named by ``run`` (its recorded recipe wins) or start a new one from the recipe.

    Without a ``run_id``, inside a flow run, the run id is derived from the flow run
    (:mod:`flows.naming`): a retry of that flow run resumes the same run. The flow run is named and
    tagged after the run id."""
    recipe, paths = open_or_start(run)
    label_flow_run(paths.run_id)
    return recipe, paths


def open_or_start(run: RunParams) -> tuple[Recipe, RunPaths]:
    # An existing run opened on an explicit store needs no recipe file (its run.json holds it).
    explicit = (run.store or os.environ.get(ENV_STORE) or "") if run.run_id else ""
    recipe = None if explicit else load_recipe(run.recipe_path)
    store = explicit or default_store(run.store, recipe.store if recipe else None)
    run_id = run.run_id or (derived_run_id(recipe.name) if recipe else None)
    if run_id and storage.exists(RunPaths(store, run_id).run_json):
        return open_run(run_id, store)
    recipe = recipe or load_recipe(run.recipe_path)
    return recipe, start_run(recipe, run_id, store)


def apply_verify(paths: RunPaths, recipe: Recipe, verify: Any, by: str) -> Recipe:
    """Re-judge the run with new ``verify`` settings (None: keep the run's): ``run.json`` records
    them, one log line says what changed, and the filter stage judges every shard again."""
    if verify is None:
        return recipe
    from octomed_data.runs import change_verify

    recipe, line = change_verify(paths, verify, by=by)
    if line:
        get_run_logger().warning(line)
    return recipe


def run_stage_flow(
    stage: Stage,
    run: RunParams,
    *,
    ray: bool = False,
    ray_address: str | None = None,
    raise_on_failure: bool = True,
    also_pending: bool = False,
    max_in_flight: int | None = None,
) -> StageResult:
    """Run ``stage`` with the Prefect executor (shards named in ``run``, else all) and publish its table."""
    from prefect.artifacts import update_progress_artifact

    from tasks.prefect_executor import PrefectExecutor

    paths = stage.paths
    with stage.viewing():  # the shard names from two listings: no marker read, none held
        shards = stage.select(run.shards)
    progress_id = new_progress_artifact(paths, stage.name) if len(shards) > 1 else None
    done = [0]

    def on_outcome(outcome: Any) -> None:
        done[0] += 1
        if outcome.state == "FAILED":
            get_run_logger().error("%s shard %s failed: %s", stage.name, outcome.shard, outcome.error)
        if progress_id is not None:
            update_progress_artifact(progress_id, 100.0 * done[0] / len(shards))

    executor = PrefectExecutor(
        ray=ray, ray_address=ray_address, on_outcome=on_outcome, max_in_flight=max_in_flight
    )
    result = run_stage(stage, executor, shards=run.shards, also_pending=also_pending)
    if progress_id is not None:  # shards answered from their markers count as done too
        finished = sum(o.state != "FAILED" for o in result.outcomes.values())
        update_progress_artifact(progress_id, 100.0 * finished / max(1, len(result.outcomes)))
    if result.stale:
        print(f"{stage.name}: dropped outputs of vanished input shards {result.stale}")
    if not stage.global_step:
        publish_shard_table(paths, stage.name)
    if raise_on_failure:
        raise_for_failures(result, lambda bad: rerun_hint(paths, bad))
    return result


def ray_options(recipe: Recipe, stage: str) -> dict[str, Any]:
    """``run_stage_flow``'s Ray arguments for ``stage``: the cluster when the recipe lists the stage
    in ``ray_stages`` (connected here, once, from the flow's thread), else nothing (in process)."""
    if stage not in recipe.ray_stages:
        return {}
    from flows.startup import connect_ray

    address = recipe.distill.ray_address or os.environ.get("OCTOMED_RAY_ADDRESS") or None
    connect_ray(address)
    return {"ray": True, "ray_address": address}


def rerun_hint(paths: RunPaths, failed: Sequence[str]) -> str:
    shards = " ".join(f"--shard {s}" for s in failed)
    return f"re-run them alone: octomed-data rerun {paths.run_id} {shards} --store {paths.store}"
