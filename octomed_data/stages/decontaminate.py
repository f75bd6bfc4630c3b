"""Decontaminate stage: drop questions overlapping held-out benchmark items (:mod:`octomed_data.decontam`)."""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from typing import Any

from octomed_data import storage
from octomed_data.decontam.index import DEFAULT_PHASH_THRESHOLD, DecontamIndex
from octomed_data.decontam.shard import COUNT_KEYS, DecontamResult, decontaminate_shard, questions_dataset
from octomed_data.layout import DecontamFolder, RunPaths
from octomed_data.schema import QUESTION_SCHEMA, REMOVED_SCHEMA
from octomed_data.stages.base import Stage
from octomed_data.stages.local import LocalExecutor, raise_for_failures, run_stage

_index_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _cached_index(uri: str, built_at: float):
    """The index at ``uri`` as built at ``built_at`` (a rebuilt index is a new cache entry)."""
    return DecontamIndex.load(uri)


class DecontaminateStage(Stage):
    """``ingest/questions`` -> ``decontaminate/questions`` (kept) + ``removed``; done = ``removed``.

    With decontamination off, each shard is copied unchanged (kept) with an empty ``removed`` shard,
    so later stages read one place either way.
    """

    name = "decontaminate"

    def __init__(
        self,
        paths: RunPaths,
        *,
        enabled: bool = True,
        registry: str | None = None,
        phash_threshold: int | None = None,
        short_match: str = "item",
        source: str | None = None,
        out: str | None = None,
        index_uri: str | None = None,
    ) -> None:
        super().__init__(paths)
        self.enabled = enabled
        self.registry = registry
        self.phash_threshold = phash_threshold
        self.short_match = short_match
        self.source = source or paths.ingested
        self.out = out or paths.stage("decontaminate")
        self.index_uri = index_uri or DecontamFolder(self.out).index

    @classmethod
    def for_run(cls, paths: RunPaths, settings: Any) -> DecontaminateStage:
        """From the recipe's ``decontam`` settings."""
        return cls(
            paths,
            enabled=settings.enabled,
            registry=settings.registry,
            phash_threshold=settings.phash_threshold,
            short_match=settings.short_match,
        )

    def input_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.source, QUESTION_SCHEMA)

    def kept(self) -> storage.Dataset:
        return storage.Dataset(DecontamFolder(self.out).kept, QUESTION_SCHEMA)

    def removed(self) -> storage.Dataset:
        return storage.Dataset(DecontamFolder(self.out).removed, REMOVED_SCHEMA)

    def done_dataset(self) -> storage.Dataset:
        return self.removed()

    def output_datasets(self) -> list[storage.Dataset]:
        return [self.kept(), self.removed()]

    def fingerprint(self) -> str | None:
        return (
            f"enabled={self.enabled}|registry={self.registry}|phash={self.phash_threshold}|{self.short_match}"
        )

    @property
    def index_stamp(self) -> str:
        """Which settings the saved index was built with (and when): rebuilt when they differ."""
        return self.index_uri + ".json"

    def prepare(self, index: Any = None) -> str | None:
        """Build the benchmark index once per run (or save ``index``); shards load it by URI.

        A saved index built with other settings (registry, matching mode) is rebuilt.
        """
        if not self.enabled:
            return None
        stamp = storage.read_json(self.index_stamp) if storage.exists(self.index_stamp) else {}
        if (
            index is None
            and stamp.get("fingerprint") == self.fingerprint()
            and storage.exists(self.index_uri)
        ):
            return self.index_uri
        if index is None:
            threshold = DEFAULT_PHASH_THRESHOLD if self.phash_threshold is None else self.phash_threshold
            index = DecontamIndex.from_registry(
                self.registry, short_match=self.short_match, phash_threshold=threshold
            )
        index.save(self.index_uri)
        storage.write_json(self.index_stamp, {"fingerprint": self.fingerprint(), "built_at": time.time()})
        return self.index_uri

    def run_shard(self, shard: str) -> dict[str, Any]:
        if not self.enabled:
            table = self.input_dataset().read_shard(shard)
            counts = {"input": table.num_rows, "kept": table.num_rows, "removed": 0, "by_benchmark": {}}
            extra = self.marker_extra(shard, counts) | counts  # counts at the top, as decontaminate_shard
            self.kept().write_shard(shard, table, extra=extra)
            self.removed().write_shard(shard, REMOVED_SCHEMA.empty_table(), extra=extra)
            return counts
        self.prepare()
        with _index_lock:  # one load per process, shared by the shard threads
            index = _cached_index(self.index_uri, storage.read_json(self.index_stamp)["built_at"])
        counts = decontaminate_shard(
            index,
            self.source,
            shard,
            self.out,
            phash_threshold=self.phash_threshold,
            extra=self.marker_extra(shard, {}),
        )
        out = {k: counts[k] for k in ("input", "kept", "removed")} | {"by_benchmark": counts["by_benchmark"]}
        return out

    def done_counts(self, shard: str) -> dict[str, Any]:
        info = self.done_info(shard)  # from the pass's one look at the markers, when there is one
        extra = info.extra if info is not None else {}
        return {k: extra.get(k) for k in ("input", "kept", "removed", "by_benchmark") if k in extra}

    def finalize(self, shards: Any) -> dict[str, Any]:
        """Totals and removals per benchmark over every committed shard (streamed from markers)."""
        by_benchmark: dict[str, int] = {}
        total = {"input": 0, "kept": 0, "removed": 0}
        for shard in shards:
            counts = self.done_counts(shard)
            for k in total:
                total[k] += int(counts.get(k) or 0)
            for bench, n in (counts.get("by_benchmark") or {}).items():
                by_benchmark[bench] = by_benchmark.get(bench, 0) + n
        return total | {"removed_by_benchmark": dict(sorted(by_benchmark.items()))}


def decontaminate(
    questions_uri: str,
    out: str,
    *,
    registry: str | None = None,
    index: DecontamIndex | None = None,
    phash_threshold: int | None = None,
    short_match: str = "item",
    progress: bool = False,
) -> DecontamResult:
    """Decontaminate every committed shard of ``questions_uri`` into ``out/questions`` + ``out/removed``.

    The index is built once (from ``registry``, default the bundled pack) unless one is given;
    ``phash_threshold`` defaults to the index's (6). Shards are streamed one at a time; output
    shards left by an earlier run over other input shards are un-committed, and a summary is
    written to ``out/decontam.json``.
    """
    started = time.perf_counter()
    source = questions_dataset(questions_uri)
    storage.ensure_writable(out)
    threshold = DEFAULT_PHASH_THRESHOLD if phash_threshold is None else phash_threshold
    stage = DecontaminateStage(
        RunPaths.at(out),
        registry=registry,
        phash_threshold=phash_threshold,
        short_match=short_match,
        source=source.uri,
        out=out,
        index_uri=DecontamFolder(out).index,
    )
    if index is None:
        index = DecontamIndex.from_registry(registry, short_match=short_match, phash_threshold=threshold)
    stage.prepare(index)
    # The CLI always re-runs every shard (force): its index may differ from the last run's.
    run = run_stage(stage, LocalExecutor(progress=progress), force=True)
    raise_for_failures(run)
    result = DecontamResult(
        questions_uri=source.uri,
        kept_uri=DecontamFolder(out).kept,
        removed_uri=DecontamFolder(out).removed,
    )
    by_benchmark: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    for shard in stage.input_shards():
        counts = {k: v for k, v in stage.removed().shard_info(shard).extra.items() if k in COUNT_KEYS}
        result.shards.append(counts)
        result.input += counts["input"]
        result.kept += counts["kept"]
        result.removed += counts["removed"]
        by_benchmark.update(counts["by_benchmark"])
        by_kind.update(counts["by_kind"])
    result.by_benchmark = dict(sorted(by_benchmark.items()))
    result.by_kind = dict(sorted(by_kind.items()))
    result.seconds = round(time.perf_counter() - started, 3)
    storage.write_json(DecontamFolder(out).summary, result.to_dict())
    return result
