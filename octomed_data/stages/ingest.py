"""Ingest stage: one shard per source entry (:mod:`octomed_data.ingest` holds the logic)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from octomed_data import storage
from octomed_data.ingest import (
    EntryPlan,
    entries_uri,
    ingest_entry,
    input_version,
    plan_entries,
    quarantine_cross_duplicates,
    summarize_ingest,
)
from octomed_data.layout import RunPaths
from octomed_data.stages.base import Stage


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
