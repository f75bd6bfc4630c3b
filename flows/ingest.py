"""Ingest flow: the recipe's source entries -> question shards + quarantine, one task per entry."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import RunParams, prepare, publish_table, run_stage_flow
from flows.naming import run_name
from octomed_data.stages.ingest import IngestStage


@flow(name="ingest", flow_run_name=run_name, log_prints=True)
def ingest_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """Read the recipe's sources into ``RUN/ingest`` (one task per source entry; done entries are kept)."""
    recipe, paths = prepare(run)
    stage = IngestStage.for_run(paths, recipe.ingest_entries(), recipe.shard_size)
    summary = run_stage_flow(stage, run.model_copy(update={"shards": None})).final
    rows = [
        {"source": name} | dict(counts) for name, counts in sorted((summary.get("per_source") or {}).items())
    ]
    publish_table("ingest", paths, rows, f"Ingest per source, run {paths.run_id}")
    print(f"ingest: {summary.get('questions_uri')} ({len(summary.get('shards', []))} shard(s))")
    return {"run_id": paths.run_id, "store": paths.store} | summary
