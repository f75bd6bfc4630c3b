"""Export flow: the mixture as LLaMA-Factory sharegpt and TRL conversational Parquet."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import RunParams, configured, prepare, publish_table
from tasks.stages import export_task


@flow(name="export", log_prints=True)
def export_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """``RUN/mixture`` -> ``RUN/export/llamafactory/…`` and ``RUN/export/trl/{text,vision}/…``."""
    recipe, paths = prepare(run)
    result = configured(export_task, paths)(paths.stage("mixture"), paths, recipe.export.model_dump())
    rows = [
        {"format": fmt, "split": split, "rows": result["rows"][fmt][split], "uri": uri}
        for fmt, splits in result["datasets"].items()
        for split, uri in splits.items()
    ]
    publish_table("export", paths, rows, f"Exports, run {paths.run_id}")
    print(f"export: {result['uri']}")
    return {"run_id": paths.run_id} | result
