"""Ingest flow: every source entry of the recipe -> normalised question shards + quarantine."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import RunParams, configured, prepare, publish_shard_table, publish_table
from tasks.stages import ingest_task


@flow(name="ingest", log_prints=True)
def ingest_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """Read the recipe's sources into ``RUN/ingest`` (one task: ingest shards by size as it streams)."""
    recipe, paths = prepare(run)
    summary = configured(ingest_task, paths)(recipe.ingest_entries(), paths, recipe.shard_size)
    publish_shard_table(paths, "ingest")
    rows = [
        {"source": name} | dict(counts) for name, counts in sorted((summary.get("per_source") or {}).items())
    ]
    publish_table("ingest", paths, rows, f"Ingest per source, run {paths.run_id}")
    print(f"ingest: {summary.get('questions_uri')} ({len(summary.get('shards', []))} shard(s))")
    return {"run_id": paths.run_id, "store": paths.store} | summary
