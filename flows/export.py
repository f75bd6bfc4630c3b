"""Export flow: the mixture as LLaMA-Factory sharegpt and TRL conversational Parquet."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import RunParams, prepare, publish_table, ray_options, run_stage_flow
from flows.naming import run_name
from octomed_data.stages import GLOBAL_SHARD
from octomed_data.stages.mixture import ExportStage

EXPORT_FLOW_NAME = "export"  # a completed run of this flow is what the training automation listens for


@flow(name=EXPORT_FLOW_NAME, flow_run_name=run_name, log_prints=True)
def export_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """``RUN/mixture`` -> ``RUN/export/llamafactory/…`` and ``RUN/export/trl/{text,vision}/…``."""
    recipe, paths = prepare(run)
    stage = ExportStage(paths, recipe.export.model_dump())
    one = run.model_copy(update={"shards": None})
    result = run_stage_flow(stage, one, **ray_options(recipe, "export")).outcomes[GLOBAL_SHARD].counts
    rows = [
        {"format": fmt, "split": split, "rows": result["rows"][fmt][split], "uri": uri}
        for fmt, splits in result["datasets"].items()
        for split, uri in splits.items()
    ]
    publish_table("export", paths, rows, f"Exports, run {paths.run_id}")
    print(f"export: {result['uri']}")
    return {"run_id": paths.run_id} | result
