"""Filter flow: rejection sampling (a verdict per teacher reply, one task per shard), then the
one statistics pass, the run report and the dashboard artifacts (rejections per source, cost)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.common import (
    RunParams,
    apply_verify,
    prepare,
    publish_markdown,
    publish_table,
    ray_options,
    run_stage_flow,
)
from octomed_data.errors import StorageError
from octomed_data.layout import RunPaths
from octomed_data.recipe import Recipe
from octomed_data.report import embedded_run_report, rejection_rows, run_cost, run_statistics, sample_stats
from octomed_data.sandbox.standin import judge_for
from octomed_data.stages import GLOBAL_SHARD, LocalExecutor, raise_for_failures, run_stage
from octomed_data.stages.filter import FilterStage
from octomed_data.stages.report import ReportStage
from octomed_data.stages.runner import shard_limit
from octomed_data.verify import VerifySettings

VERIFY_HELP = (
    "New verify settings (the recipe's `verify:` block) to re-judge this run with: every filter "
    "shard is judged again from the stored replies, no distillation request. Empty keeps the run's."
)


@task(name="write-report", retries=2)
def report_task(paths: RunPaths) -> dict[str, Any]:
    """Write ``RUN/report/report.{md,png}`` (the report stage: rewritten only when what it shows
    changed) and publish the report, rejection and cost artifacts."""
    result = run_stage(ReportStage(paths), LocalExecutor(progress=False))
    raise_for_failures(result)
    counts = result.outcomes[GLOBAL_SHARD].counts
    stats = sample_stats(run_statistics(paths))
    publish_table(
        "rejections", paths, rejection_rows(stats), f"Rejection sampling per source, run {paths.run_id}"
    )
    cost = run_cost(paths)
    if cost:
        rows = [{"item": k, "value": v} for k, v in cost.items()]
        publish_table("cost", paths, rows, f"Cost so far, run {paths.run_id}")
    publish_markdown("report", paths, embedded_run_report(paths, stats=stats), f"Run report {paths.run_id}")
    return {k: counts[k] for k in ("report", "plot", "samples", "accepted", "sandbox")}


@contextlib.contextmanager
def judge_teacher(recipe: Recipe) -> Iterator[Any]:
    """The verifier's judge teacher (None when no source uses one); the sandbox runs meanwhile when
    the judge has no endpoint (its verdicts then come from the sandbox, not a model)."""
    with judge_for(recipe, notice=lambda line: get_run_logger().warning(line)) as judge:
        yield judge


# At most shard_limit() filter shards at once (OCTOMED_MAX_SHARDS_IN_FLIGHT): Prefect's default
# thread pool is unbounded, and the executor submits no more than that many shards anyway.
@flow(name="filter", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=shard_limit()))
def filter_flow(
    run: RunParams = RunParams(),
    verify: VerifySettings | None = Field(None, description=VERIFY_HELP),
) -> dict[str, Any]:
    """``RUN/distill/raw`` -> ``RUN/filter/{verdicts,accepted,stats.json}``, then the report.

    ``verify`` re-judges the run with new settings (recorded in ``run.json`` and
    ``filter/verify_history.jsonl``) without distilling again."""
    recipe, paths = prepare(run)
    recipe = apply_verify(paths, recipe, verify, by="filter flow")
    with judge_teacher(recipe) as judge:
        stage = FilterStage.for_recipe(paths, recipe, judge)
        if not stage.input_shards():
            raise StorageError(f"no distilled samples at {stage.raw}: run the distill flow first")
        # Named shards are judged again; any other shard not judged yet (e.g. after a failed distill
        # shard was repaired) is judged too, so the statistics cover the whole run.
        result = run_stage_flow(
            stage, run, also_pending=True, max_in_flight=shard_limit(), **ray_options(recipe, "filter")
        )
    report = report_task(paths)
    print(
        f"filter: {report['accepted']} of {report['samples']} samples accepted; report at {report['report']}"
    )
    return {"run_id": paths.run_id, "stats_uri": paths.stats, "shards": list(result.outcomes)} | report
