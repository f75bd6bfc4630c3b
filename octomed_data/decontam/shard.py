"""Decontaminate one shard of a question dataset (:func:`decontaminate_shard`).

A shard of ``QUESTIONS/`` becomes the same-named shard of ``OUT/questions`` (kept) and
``OUT/removed`` (with the matched benchmark item). A whole dataset is the decontaminate stage
(:mod:`octomed_data.stages.decontaminate`), run by any executor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from octomed_data import storage
from octomed_data.decontam.index import DecontamError, DecontamIndex
from octomed_data.layout import DecontamFolder, IngestFolder
from octomed_data.schema import QUESTION_SCHEMA, REMOVED_SCHEMA


@dataclass
class DecontamResult:
    """What one decontamination run did."""

    questions_uri: str
    kept_uri: str
    removed_uri: str
    input: int = 0
    kept: int = 0
    removed: int = 0
    by_benchmark: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def questions_dataset(questions_uri: str) -> storage.Dataset:
    """The question dataset at ``questions_uri``, or at ``questions_uri/questions`` (an ingest output root)."""
    ds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    if ds.has_committed():
        return ds
    nested = storage.Dataset(IngestFolder(questions_uri).questions, QUESTION_SCHEMA)
    if nested.has_committed():
        return nested
    raise DecontamError(
        f"no committed question shards at {questions_uri} (nor at {nested.uri}); "
        "expected a dataset written by `octomed-data ingest`"
    )


def decontaminate_shard(
    index: DecontamIndex,
    questions_uri: str,
    shard: str,
    out: str,
    *,
    phash_threshold: int | None = None,
    batch_size: int = 8192,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Decontaminate one committed question shard.

    Writes the same-named shard to ``out/questions`` (kept, QUESTION_SCHEMA) and ``out/removed``
    (REMOVED_SCHEMA, with the matched benchmark item); both are written even when empty, so a
    re-run replaces rather than duplicates. Returns the shard's counts.
    """
    source = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    kept_parts: list[pa.Table] = []
    removed_parts: list[pa.Table] = []
    by_benchmark: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    total = 0
    for batch in source.iter_batches(batch_size=batch_size, shards=[shard]):
        table = pa.Table.from_batches([batch])
        matches = index.check_table(table, phash_threshold)
        total += table.num_rows
        hit = np.fromiter((m is not None for m in matches), dtype=bool, count=len(matches))
        kept_parts.append(table.filter(pa.array(~hit)))
        if hit.any():
            found = [m for m in matches if m is not None]
            removed = table.filter(pa.array(hit))
            removed = removed.append_column("match_kind", pa.array([m.kind for m in found], pa.string()))
            removed = removed.append_column(
                "match_benchmark", pa.array([m.benchmark for m in found], pa.string())
            )
            removed = removed.append_column("match_item", pa.array([m.item_id for m in found], pa.string()))
            removed = removed.append_column("match_detail", pa.array([m.detail for m in found], pa.string()))
            removed_parts.append(removed)
            by_benchmark.update(m.benchmark for m in found)
            by_kind.update(m.kind for m in found)
    kept = _concat(kept_parts, QUESTION_SCHEMA)
    removed_table = _concat(removed_parts, REMOVED_SCHEMA)
    counts = {
        "shard": shard,
        "input": total,
        "kept": kept.num_rows,
        "removed": removed_table.num_rows,
        "by_benchmark": dict(sorted(by_benchmark.items())),
        "by_kind": dict(sorted(by_kind.items())),
    }
    if counts["kept"] + counts["removed"] != total:  # cannot happen; never write a lossy shard
        raise DecontamError(f"shard {shard}: kept + removed != input ({counts})")
    # ``removed`` is committed last: its marker is the shard's done-signal (``extra``: the stage's).
    marker = counts | dict(extra or {})
    storage.Dataset(DecontamFolder(out).kept, QUESTION_SCHEMA).write_shard(shard, kept, extra=marker)
    storage.Dataset(DecontamFolder(out).removed, REMOVED_SCHEMA).write_shard(
        shard, removed_table, extra=marker
    )
    return counts


def _concat(parts: list[pa.Table], schema: pa.Schema) -> pa.Table:
    if not parts:
        return schema.empty_table()
    return pa.concat_tables([p.select(schema.names).cast(schema) for p in parts])


COUNT_KEYS = ("shard", "input", "kept", "removed", "by_benchmark", "by_kind")
