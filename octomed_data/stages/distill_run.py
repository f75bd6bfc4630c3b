"""The distill CLI's run: the distill stage, then the filter stage, each by ``run_stage`` with the
same executor (this process, or the Ray pool), and one summary of both.

The distill stage's finalize writes ``OUT/cost.json`` (for a partial run too: what it paid), the
filter stage's ``OUT/stats.json``; nothing here writes an output of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.distill.compact import ShardReport
from octomed_data.distill.journal import raw_uri
from octomed_data.errors import StorageError
from octomed_data.inference.ratelimit import WindowBudget
from octomed_data.layout import DistillFolder, RunPaths
from octomed_data.schema import QUESTION_SCHEMA
from octomed_data.stages.base import ShardIncomplete, StageFailed, StageResult
from octomed_data.stages.committed import (
    ShardsNotCommitted,
    not_committed,
    not_committed_line,
    raise_unless_committed,
    user_message,
)
from octomed_data.stages.distill import DistillStage
from octomed_data.stages.filter import FilterStage
from octomed_data.stages.local import Executor, LocalExecutor, done_map, raise_for_failures, run_stage
from octomed_data.stages.markers import MarkerView
from octomed_data.teachers import DistillConfig


def run_distill(
    questions_uri: str,
    out: str,
    config: DistillConfig,
    executor: Executor,
    *,
    shards: Sequence[str] | None = None,
    api_keys: Mapping[str, str | SecretStr] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Distill every (or the given) questions shard with ``executor``, then judge every raw shard
    (the filter stage: ``OUT/accepted``, ``OUT/verdicts``, ``OUT/stats.json``); returns a summary.
    ``progress``: a per-sample bar (anything with ``update(n)``) for shards run in this process."""
    names, committed = asked_shards(questions_uri, shards)
    missing = [s for s in names if s not in committed]
    if missing:
        raise StorageError(f"questions shards not committed in {questions_uri}: {', '.join(missing)}")
    storage.ensure_writable(out)
    # One rate window per teacher for the whole run, not one per shard (shards run here).
    budgets = {t.name: WindowBudget(t.rpm, t.tpm, t.rate_window_s) for t in config.teachers}
    stage = DistillStage(
        RunPaths.at(out), config, questions=questions_uri, out=out, api_keys=api_keys, budgets=budgets
    )
    stage.progress = progress
    result = run_stage(stage, executor, shards=names, force=False)
    info_of = raw_infos(out, len(names))
    reports = [r for r in (shard_report(info_of(s)) for s in names) if r is not None]
    if result.failed and not reports and all(user_message(e) for e in result.failed.values()):
        raise_for_failures(result)  # no shard got as far as its raw output (a config error ...)
    reports = [r if ran_here(result, r.shard) else as_reused(r) for r in reports]
    details = {r.shard: incomplete_reason(r) for r in reports if not r.complete}
    missing = not_committed(result, names, details)
    final: dict[str, Any] = {}
    if reports:
        try:
            final = finalize(out, questions_uri, config, executor)
        except StageFailed as exc:
            if not missing:
                raise
            line = not_committed_line(stage.name, missing, len(names))
            raise ShardsNotCommitted(f"{line}; and {exc}", missing) from None
    # run_stage finalizes a stage only once every shard is done; the cost ledger (the distill
    # stage's finalize) also reports a partial run (named shards, failed samples): what it paid.
    cost = result.final or stage.finalize(stage.input_shards())
    if missing:  # another run may have committed a shard this one could not (it held the lease)
        now = done_map(stage, list(missing))
        missing = {s: why for s, why in missing.items() if not now[s]}
    summary = summarize(reports, final | cost, result.failed)
    summary["complete"] = not missing  # every asked-for shard committed (by this run or another)
    return summary | {"not_committed": missing, "asked": len(names)}


def ran_here(result: StageResult, shard: str) -> bool:
    """Whether this pass ran ``shard`` into its raw marker (complete, or committed with samples
    missing); a reused shard's marker, or one another run committed, reports that run's work."""
    outcome = result.outcomes.get(shard)
    if outcome is None:
        return False
    return outcome.state == "COMPLETED" or (
        outcome.state == "FAILED" and (outcome.error or "").startswith(ShardIncomplete.__name__)
    )


def as_reused(report: ShardReport) -> ShardReport:
    """A shard's report as a pass that sent nothing for it sees it: everything stored was there before."""
    return replace(
        report,
        stored_before=report.stored,
        new_samples=0,
        requests=0,
        retries=0,
        prompt_tokens=0,
        completion_tokens=0,
        batches=0,
        batches_resumed=0,
        batch_requests=0,
        batch_samples=0,
        batch_fallback=0,
        aborted=None,
        seconds=0.0,
    )


def incomplete_reason(report: ShardReport) -> str:
    return f"{report.failed} sample(s) failed" + (f", {report.aborted}" if report.aborted else "")


def run_local(
    questions_uri: str,
    out: str,
    config: DistillConfig,
    *,
    shards: Sequence[str] | None = None,
    api_keys: Mapping[str, str | SecretStr] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`run_distill` in this process, shard after shard, with a per-sample progress bar."""
    bar = None
    if progress:
        from tqdm import tqdm

        view = MarkerView(storage.Dataset(questions_uri, QUESTION_SCHEMA))
        names = list(shards) if shards else view.names()
        infos = [i for i in map(view.shard_info, names) if i is not None]
        total = sum(i.rows for i in infos) * config.samples
        bar = tqdm(total=total, unit="sample", desc="distill", file=sys.stderr, dynamic_ncols=True)
    try:
        executor = LocalExecutor(progress=False)
        return run_distill(
            questions_uri, out, config, executor, shards=shards, api_keys=api_keys, progress=bar
        )
    finally:
        if bar is not None:
            bar.close()


def asked_shards(questions_uri: str, shards: Sequence[str] | None) -> tuple[list[str], set[str]]:
    """The shards a run asks for (the given ones, else every committed questions shard) and the
    committed ones, from two listings of the questions dataset (no marker read); a clear error
    when it has no committed shard."""
    committed = MarkerView(storage.Dataset(questions_uri, QUESTION_SCHEMA)).names()
    if not shards and not committed:
        raise StorageError(f"no committed question shards in {questions_uri}")
    return (list(shards) if shards else committed), set(committed)


def raw_infos(out: str, asked: int) -> Callable[[str], storage.ShardInfo | None]:
    """How to read the raw markers of ``asked`` shards after a pass: one look (two listings, each
    marker read once, many at a time) unless the run has many more shards than were asked (a
    re-run of a few shards of a big run), then each asked marker alone (~3 requests a shard)."""
    raw = storage.Dataset(raw_uri(out))
    view = MarkerView(raw)
    return view.shard_info if len(view.names()) <= 3 * asked else raw.shard_info


def shard_report(info: storage.ShardInfo | None) -> ShardReport | None:
    if info is None or "report" not in info.extra:
        return None
    return ShardReport(**info.extra["report"])


def summarize(
    reports: Sequence[ShardReport], final: Mapping[str, Any], failed: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """One dict for a run: totals over the shard reports plus the finalized stats and cost."""
    keys = (
        "questions",
        "expected",
        "stored",
        "stored_before",
        "new_samples",
        "failed",
        "requests",
        "retries",
    )
    totals = {k: sum(getattr(r, k) for r in reports) for k in keys}
    overall = (final.get("stats") or {}).get("overall") or {}
    return {
        **totals,
        "accepted": overall.get("accepted", 0),
        "rejected": overall.get("reject_reasons", {}),
        "complete": bool(reports) and all(r.complete for r in reports) and not failed,
        "aborted": next((r.aborted for r in reports if r.aborted), None),
        "errors": dict(failed or {}),
        "shards": [r.to_dict() for r in reports],
        "stats_uri": final.get("stats_uri"),
        "cost_uri": final.get("cost_uri"),
        "accepted_uri": final.get("accepted_uri"),
        "total_usd": final.get("cost", {}).get("total_usd"),
    }


def finalize(
    out: str,
    questions_uri: str | None = None,
    config: DistillConfig | None = None,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Judge every raw shard: the filter stage by ``run_stage`` (into ``OUT/accepted`` +
    ``OUT/verdicts``; its finalize writes ``OUT/stats.json``). The config (for N) defaults to the
    one the engine saved in ``OUT/_distill``."""
    if config is None:
        saved = DistillFolder(out).config
        config = DistillConfig.parse(storage.read_json(saved), where=saved) if storage.exists(saved) else None
    raw = raw_uri(out)
    if questions_uri is None:
        raise StorageError(f"judging {raw} needs the questions dataset (options): pass questions_uri")
    stage = FilterStage(
        RunPaths.at(out),
        raw=raw,
        questions=questions_uri,
        out=out,
        samples_per_question=config.samples if config else None,
    )
    result = run_stage(stage, executor or LocalExecutor(progress=False), force=False)
    raise_unless_committed(result)  # one line: the filter shards not committed, and why
    return result.final | {"accepted_uri": stage.accepted_uri}
