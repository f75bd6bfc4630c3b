"""Decontaminate flow: drop questions that overlap held-out benchmark items, one task per shard."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import (
    RunParams,
    ShardFailures,
    collect,
    configured,
    prepare,
    publish_shard_table,
    publish_table,
    rerun_hint,
    wanted_shards,
)
from octomed_data import storage
from octomed_data.errors import StorageError
from tasks.stages import decontam_index_task, decontaminate_shard_task, passthrough_task


@flow(name="decontaminate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def decontaminate_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """``RUN/ingest/questions`` -> ``RUN/decontaminate/{questions,removed}``, shard by shard."""
    recipe, paths = prepare(run)
    source = storage.Dataset(storage.join(paths.stage("ingest"), "questions"))
    available = list(source.manifest())
    if not available:
        raise StorageError(f"no ingested questions at {source.uri}: run the ingest flow first")
    shards = wanted_shards(run, available)
    refresh = bool(run.shards)  # a shard named explicitly is re-run, not served from cache
    if recipe.decontam.enabled:
        index_uri = configured(decontam_index_task, paths)(recipe.decontam, paths)
        task = configured(decontaminate_shard_task, paths, refresh=refresh)
        futures = {s: task.submit(index_uri, source.uri, s, recipe.decontam, paths) for s in shards}
    else:
        task = configured(passthrough_task, paths, refresh=refresh)
        futures = {s: task.submit(source.uri, s, paths) for s in shards}
    results, failed = collect(futures, "decontaminate")
    publish_shard_table(paths, "decontaminate")
    removed_by_benchmark: dict[str, int] = {}
    for counts in results.values():
        for bench, n in (counts.get("by_benchmark") or {}).items():
            removed_by_benchmark[bench] = removed_by_benchmark.get(bench, 0) + n
    publish_table(
        "decontamination",
        paths,
        [{"benchmark": b, "removed": n} for b, n in sorted(removed_by_benchmark.items())],
        f"Questions removed by decontamination, run {paths.run_id}",
    )
    if failed:
        raise ShardFailures(
            f"{len(failed)} decontamination shard(s) failed: {failed}; {rerun_hint(paths, failed)}"
        )
    if not run.shards:
        # A full run also un-commits outputs of input shards that no longer exist.
        from octomed_data.decontam import drop_stale_shards

        stale = drop_stale_shards(paths.stage("decontaminate"), available)
        if stale:
            print(f"decontaminate: dropped outputs of vanished input shards {stale}")
    summary = {
        "run_id": paths.run_id,
        "questions_uri": paths.questions,
        "shards": shards,
        "input": sum(c.get("input") or 0 for c in results.values()),
        "removed": sum(c.get("removed") or 0 for c in results.values()),
        "removed_by_benchmark": removed_by_benchmark,
    }
    print(f"decontaminate: {summary['removed']} of {summary['input']} question(s) removed")
    return summary
