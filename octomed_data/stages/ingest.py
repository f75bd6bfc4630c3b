"""Ingest stage: one shard per source entry (:mod:`octomed_data.ingest` holds the logic), and
:func:`ingest` / :func:`ingest_many`, the stage over files into one output folder (the CLI's)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.ingest import (
    EntryPlan,
    IngestResult,
    check_output,
    entries_uri,
    ingest_entry,
    input_version,
    plan_entries,
    quarantine_cross_duplicates,
    summarize_ingest,
)
from octomed_data.layout import RunPaths
from octomed_data.stages.base import Stage
from octomed_data.stages.local import LocalExecutor, raise_for_failures, run_stage


class IngestStage(Stage):
    """Source entries -> ``ingest/questions``, ``quarantine``, ``images``; done = ``ingest/entries``."""

    name = "ingest"

    def __init__(
        self,
        paths: RunPaths,
        plans: Sequence[EntryPlan],
        *,
        shard_size: int = 5000,
        out: str | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(paths)
        self.plans = list(plans)
        self.by_name = {p.name: p for p in self.plans}
        self.shard_size = shard_size
        self.out = out or paths.stage("ingest")
        self.progress = progress

    @classmethod
    def for_run(cls, paths: RunPaths, entries: Sequence[dict[str, Any]], shard_size: int) -> IngestStage:
        return cls(paths, plan_entries(entries), shard_size=shard_size)

    @classmethod
    def for_folder(cls, out: str, plans: Sequence[EntryPlan], **kwargs: Any) -> IngestStage:
        """The stage writing straight into ``out`` (``octomed-data ingest --out``)."""
        return cls(RunPaths.at(out), plans, out=out, **kwargs)

    def input_shards(self) -> list[str]:
        return [p.name for p in self.plans]  # recipe order: the first entry wins a duplicate

    def done_dataset(self) -> storage.Dataset:
        return storage.Dataset(entries_uri(self.out))

    def fingerprint(self) -> str | None:
        return None

    def is_done(self, shard: str) -> bool:
        if not super().is_done(shard):
            return False
        entries = self.done_dataset()
        info = entries.shard_info(shard)
        entry = self.by_name[shard].entry
        # The same entry name over another input is not done: it replaces those shards.
        if info.extra.get("input") != str(entry["input"]) or info.extra.get("format") != entry["format"]:
            return False
        if info.extra.get("input_version") != input_version(str(entry["input"])):
            return False  # the input was edited in place
        # Rows moved out as duplicates of an earlier entry come back when that entry changed.
        for earlier, committed_at in (info.extra.get("dedup_against") or {}).items():
            now = entries.shard_info(earlier)
            if now is None or now.committed_at != committed_at:
                return False
        return True

    def drop_stale(self, inputs: Sequence[str]) -> list[str]:
        return []  # other prefixes in the same folder belong to other ingests (CLI): never dropped

    def run_shard(self, shard: str) -> dict[str, Any]:
        counts = ingest_entry(
            self.by_name[shard], self.out, shard_size=self.shard_size, progress=self.progress
        )
        return {k: counts[k] for k in ("records", "questions", "quarantined")}

    def done_counts(self, shard: str) -> dict[str, Any]:
        counts = super().done_counts(shard)
        return {k: counts.get(k) for k in ("records", "questions", "quarantined")}

    def finalize(self, shards: Sequence[str]) -> dict[str, Any]:
        quarantine_cross_duplicates(self.out, self.plans)
        return summarize_ingest(self.out, self.plans).to_dict()


def ingest_many(
    entries: Iterable[Mapping[str, Any]],
    out: str,
    *,
    shard_size: int = 5000,
    progress: bool = False,
    shard_prefix: bool = True,
) -> IngestResult:
    """Ingest several inputs into one output (questions, quarantine, images under ``out``).

    Each entry is a mapping: ``format``, ``input`` (path), optional ``images`` (folder),
    ``name`` (shard prefix; defaults to the format), ``split``, ``source`` (name written to
    rows; defaults to the format) and ``options`` (per-format ``--option`` values). Shards are named
    ``<name>-00000`` ...; with ``shard_prefix=False`` and a single entry, ``00000`` ...
    Raises :class:`~octomed_data.errors.OctomedError` for an unknown format, a missing
    input or an unusable output before any record is read. Runs the ingest stage (one shard per
    entry) with the local executor.
    """
    if shard_size < 1:
        raise ConfigError(f"shard size must be >= 1, got {shard_size}")
    plans = plan_entries(entries, shard_prefix=shard_prefix)
    check_output(out)
    started = time.perf_counter()
    stage = IngestStage.for_folder(out, plans, shard_size=shard_size, progress=progress)
    result = run_stage(stage, LocalExecutor(progress=False), force=True)
    raise_for_failures(result)
    summary = summarize_ingest(out, plans, seconds=round(time.perf_counter() - started, 3))
    return summary


def ingest(
    fmt: str,
    input_path: str,
    out: str,
    *,
    images: str | None = None,
    shard_size: int = 5000,
    progress: bool = False,
    shard_prefix: str | None = None,
    **options: Any,
) -> IngestResult:
    """Ingest one input file (or folder) read as ``fmt`` into ``out``.

    Writes ``out/questions`` (shards ``00000``, ``00001``, ... or ``<shard_prefix>-00000`` ...),
    ``out/quarantine`` and ``out/images/``; ``options`` are the format's options (``split``,
    ``source``, loader-specific keys). Use ``shard_prefix`` when several ingests write into
    the same ``out`` independently (each owns its prefix).
    """
    entry = {"format": fmt, "input": input_path, "images": images, "options": options, "name": shard_prefix}
    return ingest_many(
        [entry], out, shard_size=shard_size, progress=progress, shard_prefix=bool(shard_prefix)
    )
