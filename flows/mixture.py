"""Mixture flow: accepted traces -> weighted, capped, deduplicated, shuffled train/validation sets."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import RunParams, prepare, publish_table, ray_options, run_stage_flow
from flows.naming import run_name
from octomed_data.stages import GLOBAL_SHARD
from octomed_data.stages.mixture import MixtureStage

MIXTURE_FLOW_NAME = "mixture"


@flow(name=MIXTURE_FLOW_NAME, flow_run_name=run_name, log_prints=True)
def mixture_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """Build ``RUN/mixture/{train,validation}`` from ``RUN/filter/accepted`` and the questions."""
    recipe, paths = prepare(run)
    stage = MixtureStage(paths, recipe.mixture)
    result = run_stage_flow(stage, run.model_copy(update={"shards": None}), **ray_options(recipe, "mixture"))
    mix = result.outcomes[GLOBAL_SHARD].counts  # also when done before (from the marker)
    rows = [{"source": s} | c for s, c in sorted(mix["sources"].items())]
    publish_table("mixture", paths, rows, f"Mixture per source, run {paths.run_id}")
    print(f"mixture: {mix['rows_train']} train / {mix['rows_validation']} validation rows at {mix['uri']}")
    return {"run_id": paths.run_id} | mix
