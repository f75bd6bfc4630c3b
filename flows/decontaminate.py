"""Decontaminate flow: drop questions that overlap held-out benchmark items, one task per shard."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import RunParams, prepare, publish_table, run_stage_flow
from flows.naming import run_name
from octomed_data.errors import StorageError
from octomed_data.stages.decontaminate import DecontaminateStage


@flow(
    name="decontaminate",
    flow_run_name=run_name,
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=2),
)
def decontaminate_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """``RUN/ingest/questions`` -> ``RUN/decontaminate/{questions,removed}``, shard by shard."""
    recipe, paths = prepare(run)
    stage = DecontaminateStage.for_run(paths, recipe.decontam)
    if not stage.input_shards():
        raise StorageError(f"no ingested questions at {stage.source}: run the ingest flow first")
    stage.prepare()  # the benchmark index, built once per run before the shards fan out
    result = run_stage_flow(stage, run)
    final = result.final or stage.finalize(stage.input_shards())
    publish_table(
        "decontamination",
        paths,
        [{"benchmark": b, "removed": n} for b, n in final["removed_by_benchmark"].items()],
        f"Questions removed by decontamination, run {paths.run_id}",
    )
    print(f"decontaminate: {final['removed']} of {final['input']} question(s) removed")
    return {"run_id": paths.run_id, "questions_uri": paths.questions, "shards": list(result.outcomes)} | final
