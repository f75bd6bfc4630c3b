"""The mixture's inputs as Arrow batches: accepted traces (without those of audit-flagged questions),
questions, the mean Python size of their first rows, and their rows' hash buckets.

The partition pass works on whole batches: one ``to_pylist`` of the few columns the per-row hashes
need, never a dict per row, so its per-row Python work does not repeat per spill level."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from octomed_data import storage
from octomed_data.audit import flagged_questions
from octomed_data.layout import FilterFolder
from octomed_data.mixture_config import SourceCounts
from octomed_data.mixture_partition import row_bytes
from octomed_data.mixture_select import h64

BATCH_ROWS = 2048


def audit_uri_beside(accepted_uri: str) -> str:
    """The filter's audit dataset beside its ``accepted`` dataset (``filter/accepted`` -> ``filter/audit``)."""
    trimmed = accepted_uri.rstrip("/")
    return FilterFolder(trimmed.rsplit("/", 1)[0] if "/" in trimmed else ".").audit


def iter_batches(uris: Iterable[str], columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    for uri in uris:
        yield from storage.Dataset(uri).iter_batches(
            batch_size=BATCH_ROWS, columns=columns, fill_missing=True
        )


def iter_unflagged(
    uris: Sequence[str],
    audits: Sequence[str],
    flags: Sequence[str],
    columns: Sequence[str],
    counts: dict[str, SourceCounts],
) -> Iterator[pa.RecordBatch]:
    """Accepted batches shard by shard, without the correct traces of questions the audit flagged
    (counted: read, then left out)."""
    for uri, audit in zip(uris, audits, strict=True):
        ds = storage.Dataset(uri)
        for shard in ds.committed_names():
            flagged = flagged_questions(audit, shard, flags)
            excluded: set[str] = set()
            for batch in ds.iter_batches(
                batch_size=BATCH_ROWS, columns=columns, shards=[shard], fill_missing=True
            ):
                if not flagged:
                    yield batch
                    continue
                keep = []
                qids, sources, correct = (
                    batch.column(c).to_pylist() for c in ("question_id", "source", "correct")
                )
                for qid, src, ok in zip(qids, sources, correct, strict=True):
                    drop = qid in flagged and bool(ok)
                    keep.append(not drop)
                    if drop:
                        counts[src].accepted += 1
                        counts[src].excluded_by_audit += 1
                        if qid not in excluded:
                            excluded.add(qid)
                            counts[src].questions_excluded_by_audit += 1
                yield batch.filter(pa.array(keep, pa.bool_()))


def peek_mean_bytes(
    batches: Iterator[pa.RecordBatch], n: int = 512
) -> tuple[Iterator[pa.RecordBatch], float]:
    """``batches`` unchanged, and the mean Python size of their first ``n`` rows as dicts (0 when empty)."""
    head: list[pa.RecordBatch] = []
    rows: list[dict] = []
    for batch in batches:
        head.append(batch)
        rows.extend(batch.slice(0, n - len(rows)).to_pylist())
        if len(rows) >= n:
            break
    mean = sum(row_bytes(r) for r in rows) / len(rows) if rows else 0.0
    return itertools.chain(head, batches), mean


def correct_only(batch: pa.RecordBatch) -> pa.Table:
    """The batch's rows whose ``correct`` is true (only accepted traces enter a mixture)."""
    correct = batch.column(batch.schema.get_field_index("correct"))
    if pa.types.is_null(correct.type):
        return pa.Table.from_batches([batch]).slice(0, 0)
    return pa.Table.from_batches([batch]).filter(pc.fill_null(correct, False))


def bucket_hasher(n_buckets: int) -> Callable[[pa.Table], np.ndarray]:
    """table -> each row's bucket, ``h64("bucket", question_id) % n_buckets``, hashed once per distinct id."""

    def question_bucket(table: pa.Table) -> np.ndarray:
        ids = table.column("question_id").combine_chunks()
        if not len(ids):
            return np.zeros(0, dtype=np.int64)
        encoded = pc.dictionary_encode(ids)
        hashed = np.array(
            [h64("bucket", q) % n_buckets for q in encoded.dictionary.to_pylist()], dtype=np.int64
        )
        return hashed[encoded.indices.to_numpy(zero_copy_only=False)]

    return question_bucket
