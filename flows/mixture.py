"""Mixture flow: accepted traces -> weighted, capped, deduplicated, shuffled train/validation sets.

A completed run of this flow is what the training automation listens for.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import RunParams, configured, prepare, publish_table
from octomed_data import storage
from octomed_data.errors import StorageError
from tasks.stages import mixture_task

MIXTURE_FLOW_NAME = "mixture"


@flow(name=MIXTURE_FLOW_NAME, log_prints=True)
def mixture_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """Build ``RUN/mixture/{train,validation}`` from ``RUN/distill/accepted`` and the questions."""
    recipe, paths = prepare(run)
    accepted = storage.join(paths.stage("distill"), "accepted")
    if not storage.Dataset(accepted).manifest():
        raise StorageError(f"no accepted samples at {accepted}: run the distill flow first")
    result = configured(mixture_task, paths)(accepted, paths.questions, paths, recipe.mixture)
    rows = [{"source": s} | c for s, c in sorted(result["sources"].items())]
    publish_table("mixture", paths, rows, f"Mixture per source, run {paths.run_id}")
    print(
        f"mixture: {result['rows_train']} train / {result['rows_validation']} validation rows at {result['uri']}"
    )
    return {"run_id": paths.run_id} | result
