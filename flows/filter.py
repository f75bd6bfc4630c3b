"""Filter flow: the rejection-sampling verdicts summed up, with the run report and dashboard artifacts.

Each sample's verdict (final answer == gold) is decided while distilling, so ``RUN/distill/accepted``
already holds only correct traces. This flow finalises that stage: per-source statistics and the
cost ledger (``stats.json``, ``cost.json``), the report (PNG + markdown) and the artifacts the
dashboard shows: rejection statistics per source, cost so far, shard table.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.common import RunParams, configured, prepare, publish_markdown, publish_shard_table, publish_table
from octomed_data import storage
from octomed_data.recipe import RunPaths, shard_states
from octomed_data.report import rejection_rows, report_markdown, write_report
from tasks.stages import RETRY, finalize_task


def _cost(paths: RunPaths) -> dict[str, Any]:
    uri = storage.join(paths.stage("distill"), "cost.json")
    if not storage.exists(uri):
        return {}
    cost = storage.read_json(uri)
    flat = {k: v for k, v in cost.items() if isinstance(v, int | float | str)}
    return flat or {"cost": str(cost)[:200]}


def run_outputs(paths: RunPaths) -> dict[str, str]:
    """The run's output locations that exist so far, for the report's table."""
    candidates = {
        "questions (ingested)": storage.join(paths.stage("ingest"), "questions"),
        "quarantine": storage.join(paths.stage("ingest"), "quarantine"),
        "questions (decontaminated)": paths.questions,
        "removed by decontamination": storage.join(paths.stage("decontaminate"), "removed"),
        "samples (all verdicts)": storage.join(paths.stage("distill"), "raw"),
        "samples (accepted)": storage.join(paths.stage("distill"), "accepted"),
        "mixture": paths.stage("mixture"),
        "export": paths.stage("export"),
        "checkpoint": paths.stage("checkpoints"),
        "evaluation": paths.stage("evaluate"),
    }
    return {k: v for k, v in candidates.items() if storage.exists(v)}


def run_counts(paths: RunPaths) -> dict[str, Any]:
    """Question counts per stage, and what decontamination removed per benchmark (streamed)."""
    from collections import Counter

    def rows(uri: str) -> int | None:
        ds = storage.Dataset(uri)
        return ds.num_rows() if ds.manifest() else None

    counts: dict[str, Any] = {
        "questions ingested": rows(storage.join(paths.stage("ingest"), "questions")),
        "records quarantined": rows(storage.join(paths.stage("ingest"), "quarantine")),
        "questions after decontamination": rows(paths.questions),
        "mixture rows (train)": rows(storage.join(paths.stage("mixture"), "train")),
        "mixture rows (validation)": rows(storage.join(paths.stage("mixture"), "validation")),
    }
    removed = storage.Dataset(storage.join(paths.stage("decontaminate"), "removed"))
    if removed.manifest():
        by_benchmark: Counter[str] = Counter()
        for batch in removed.iter_batches(columns=["match_benchmark"]):
            by_benchmark.update(batch.column(0).to_pylist())
        counts["removed by decontamination"] = sum(by_benchmark.values())
        for bench, n in sorted(by_benchmark.items()):
            counts[f"  removed: {bench}"] = n
    return {k: v for k, v in counts.items() if v is not None}


@task(name="write-report", **RETRY)
def report_task(paths: RunPaths) -> dict[str, Any]:
    """Write ``RUN/report/report.{md,png}`` and publish the report and rejection artifacts."""
    cost = _cost(paths)
    result = write_report(
        storage.join(paths.stage("distill"), "raw"),
        paths.stage("report"),
        run_id=paths.run_id,
        shards=shard_states(paths),
        outputs=run_outputs(paths),
        cost=cost,
        counts=run_counts(paths),
    )
    publish_table(
        "rejections",
        paths,
        rejection_rows(result.stats),
        f"Rejection sampling per source, run {paths.run_id}",
    )
    if cost:
        publish_table(
            "cost",
            paths,
            [{"item": k, "value": v} for k, v in cost.items()],
            f"Cost so far, run {paths.run_id}",
        )
    # The dashboard copy embeds the PNG (the stored file may not be reachable from a browser).
    embedded = report_markdown(
        run_id=paths.run_id,
        stats=result.stats,
        shards=shard_states(paths),
        outputs=run_outputs(paths) | {"report": result.markdown_uri, "plot": result.png_uri},
        cost=cost,
        counts=run_counts(paths),
        png=storage.read_bytes(result.png_uri),
    )
    publish_markdown("report", paths, embedded, f"Run report {paths.run_id}")
    return {
        "report": result.markdown_uri,
        "plot": result.png_uri,
        "samples": result.stats.samples,
        "accepted": result.stats.accepted,
        "sandbox": result.stats.any_sandbox,
    }


@flow(name="filter", log_prints=True)
def filter_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """Finalise rejection sampling: statistics, cost ledger, report and artifacts."""
    _, paths = prepare(run)
    stats = configured(finalize_task, paths)(paths, paths.questions)
    report = configured(report_task, paths)(paths)
    publish_shard_table(paths)
    print(
        f"filter: {report['accepted']} of {report['samples']} samples accepted; report at {report['report']}"
    )
    return {"run_id": paths.run_id, "stats": stats, **report}
