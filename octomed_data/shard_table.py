"""The shard table of a run or a stage, read one record at a time: a table of every shard up to
:data:`SHARD_TABLE_ROWS` shards; past that a summary (:class:`ShardSummary`: shards by state,
counts and seconds summed per stage, the first :data:`FAILED_ROWS` failed shards) and the full
table as CSV in the run's ``report/`` folder. Only the CSV text (~100 bytes a shard) grows with
the run, never the records (~1.5 KB a shard as Python objects): the dashboard's shard cards
(``flows/artifacts.py``) and the run report (:mod:`octomed_data.report`) both use it.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.runs import iter_shard_states

SHARD_TABLE_ROWS = 300  # a table up to this many shards; past it a summary + the CSV file
FAILED_ROWS = 100  # failed shards listed on a summary (the CSV has all of them)
COUNT_KEYS = ("input", "kept", "removed", "questions", "samples", "accepted", "seconds")
# The columns: stage, shard, state, error (early: visible without scrolling), attempts, seconds over
# every attempt, counts; then each shard's batches by status (batch-mode teachers).
SHARD_TABLE_KEYS = ("stage", "shard", "state", "error", "attempt", "seconds", "input", "kept", "removed")
SHARD_TABLE_KEYS += ("questions", "samples", "accepted", "batch")


def shard_table_rows(shards: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the shard table (:func:`shard_table_row`); the batch column only where a shard has
    batches."""
    shards = list(shards)
    batch = any(s.get("batch") for s in shards)
    return [shard_table_row(s, batch=batch) for s in shards]


def shard_table_row(shard: Mapping[str, Any], *, batch: bool = True) -> dict[str, Any]:
    """One shard's row of the table (:data:`SHARD_TABLE_KEYS`; unknown keys are dropped)."""
    row = {k: shard.get(k) for k in SHARD_TABLE_KEYS if batch or k != "batch"}
    if shard.get("total_seconds") is not None:
        row["seconds"] = shard["total_seconds"]  # every attempt's time, not only the last one's
    return row


def shard_table_csv(rows: Iterable[Mapping[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SHARD_TABLE_KEYS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()})
    return out.getvalue().encode("utf-8")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")[:200]


class ShardSummary:
    """A big run's shard table summarised row by row (never every row held): shards by state,
    counts and seconds summed, per stage; the first :data:`FAILED_ROWS` failed shards and how many
    failed."""

    def __init__(self) -> None:
        self.total = 0
        self.states: dict[str, Counter] = defaultdict(Counter)
        self.sums: dict[str, dict[str, float]] = defaultdict(dict)  # stage -> key -> sum (keys seen)
        self.failed: list[dict[str, Any]] = []
        self.failed_count = 0

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        """Count ``row`` in; returns it."""
        stage = str(row.get("stage") or "?")
        self.total += 1
        self.states[stage][str(row.get("state"))] += 1
        sums = self.sums[stage]
        for key in COUNT_KEYS:
            if row.get(key) is not None or key in sums:
                sums[key] = sums.get(key, 0.0) + _number(row.get(key))
        if row.get("state") in ("FAILED", "CANCELLED"):
            self.failed_count += 1
            if len(self.failed) < FAILED_ROWS:
                self.failed.append({k: row.get(k) for k in ("stage", "shard", "attempt", "error")})
        return row

    def markdown(self, table_uri: str, title: str = "", level: int = 1) -> str:
        """A table per stage, the failed shards, and where the full table is; under ``title`` at
        heading ``level`` (its sections one level below)."""
        sub = "#" * (level + 1)
        lines = [f"{'#' * level} {title}: {self.total} shards", ""] if title else []
        link = table_uri if "://" in table_uri else f"file://{table_uri}"
        lines += [f"Full table (one row per shard): [{table_uri}]({link})", ""]
        for stage, states in self.states.items():
            lines += [f"{sub} {stage}: {states.total()} shards", "", "| | total |", "|---|---|"]
            lines += [f"| {state} | {n} |" for state, n in sorted(states.items())]
            for key in (k for k in COUNT_KEYS if k in self.sums[stage]):
                total = self.sums[stage][key]
                lines.append(f"| {key} | {total:,.1f} |" if key == "seconds" else f"| {key} | {total:,.0f} |")
            lines.append("")
        lines += [f"{sub} Failed shards: {self.failed_count}", ""]
        if self.failed:
            lines += ["| stage | shard | attempts | error |", "|---|---|---|---|"]
            lines += [
                f"| {_cell(r['stage'])} | {_cell(r['shard'])} | {_cell(r['attempt'])} | {_cell(r['error'])} |"
                for r in self.failed
            ]
            if self.failed_count > FAILED_ROWS:
                lines.append(f"\n... and {self.failed_count - FAILED_ROWS} more (see the full table)")
        return "\n".join(lines)


def shard_summary_markdown(paths: RunPaths, rows: Iterable[Mapping[str, Any]], table_uri: str) -> str:
    """:class:`ShardSummary`'s card over ``rows``."""
    summary = ShardSummary()
    for row in rows:
        summary.add(row)
    return summary.markdown(table_uri, f"Shards of run `{paths.run_id}`")


@dataclass
class ShardTable:
    """A run's (a stage's) shard table: its ``rows`` when there are at most :data:`SHARD_TABLE_ROWS`
    shards, else a ``summary`` with the full table written to ``table_uri``."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: ShardSummary | None = None
    table_uri: str = ""

    @property
    def total(self) -> int:
        return self.summary.total if self.summary is not None else len(self.rows)


def shard_table(paths: RunPaths, stage: str | None = None) -> ShardTable:
    """The shard table of ``paths``' run (one ``stage``, else all), reading one record at a time;
    past :data:`SHARD_TABLE_ROWS` shards the full table goes to ``report/shards[-<stage>].csv``."""
    states = iter(iter_shard_states(paths, stage))
    head = list(islice(states, SHARD_TABLE_ROWS + 1))
    if len(head) <= SHARD_TABLE_ROWS:
        return ShardTable(rows=shard_table_rows(head))
    summary = ShardSummary()

    def rows() -> Iterator[dict[str, Any]]:
        while head:  # the first records, let go as they are written
            yield summary.add(shard_table_row(head.pop(0)))
        for state in states:
            yield summary.add(shard_table_row(state))

    table_uri = paths.shard_table(stage)
    storage.write_bytes(table_uri, shard_table_csv(rows()))
    return ShardTable(summary=summary, table_uri=table_uri)
