"""The distillation journal: sample keys, the committed raw shard, and retiring compacted segments.

The journal itself (append-only zstd segments written whole through the storage layer,
:class:`JournalWriter`) is the request processor's (:mod:`octomed_data.inference.journal`). A
sample counts as done only once its segment is written. Compressed, the journal stays within
about the size of the Parquet it is compacted into; once a shard is compacted and the committed
file checked, the engine deletes (or archives) its segments: the committed raw shard then holds
the done keys (:func:`read_done_keys` reads both).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from octomed_data import storage
from octomed_data.inference.journal import (
    FAILED,
    LEGACY_SUFFIX,
    SEGMENT_SUFFIX,
    JournalWriter,
    iter_journal,
    journal_uri,
    segment_uris,
)
from octomed_data.layout import DistillFolder
from octomed_data.schema import SAMPLE_SCHEMA

__all__ = [
    "FAILED",
    "LEGACY_SUFFIX",
    "SEGMENT_SUFFIX",
    "JournalWriter",
    "committed_rows",
    "iter_journal",
    "journal_uri",
    "read_done_keys",
    "retire",
    "row_key",
    "sample_key",
    "segment_uris",
]

ARCHIVE_DIR = "_journal_archive"
# After a shard is compacted: delete its segments, move them to ARCHIVE_DIR, or leave them.
AFTER_COMPACT = ("delete", "archive", "keep")


def sample_key(question_id: str, model: str, prompt_version: str, params_hash: str, sample_idx: int) -> str:
    """The identity of one sample: re-running with the same key must not pay for it again."""
    return f"{question_id}|{model}|{prompt_version}|{params_hash}|{sample_idx}"


def row_key(row: dict[str, Any]) -> str:
    return sample_key(
        row["question_id"], row["model"], row["prompt_version"], row["params_hash"], int(row["sample_idx"])
    )


def raw_uri(out: str) -> str:
    """The compacted, committed samples: ``OUT/raw`` (the shard's done-signal)."""
    return DistillFolder(out).raw


KEY_COLUMNS = [
    "question_id",
    "task_type",
    "model",
    "prompt_version",
    "params_hash",
    "sample_idx",
    "reject_reason",
]


def committed_rows(out: str, shard: str, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of the shard's committed raw output (none without a marker): the done keys that
    outlive the journal, which is retired once the shard is compacted."""
    ds = storage.Dataset(raw_uri(out), SAMPLE_SCHEMA)
    info = ds.shard_info(shard)
    if info is None or not storage.exists(storage.join(ds.uri, info.file)):
        return
    for batch in ds.iter_batches(batch_size=4096, columns=columns, shards=[shard]):
        yield from batch.to_pylist()


def read_done_keys(out: str, shard: str) -> tuple[set[str], set[str]]:
    """(keys stored as finished samples, keys whose last record is a failure).

    Read from the shard's committed raw output first (after compaction the journal may be gone),
    then from the journal written since.
    """
    done: set[str] = set()
    failed: set[str] = set()
    for rec in _chain(committed_rows(out, shard, KEY_COLUMNS), iter_journal(out, shard)):
        key = row_key(rec)
        if rec.get("reject_reason") == FAILED:
            failed.add(key)
        else:
            done.add(key)
    return done, failed - done


def _chain(*parts: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for part in parts:
        yield from part


def retire(out: str, shard: str, mode: str = "delete") -> int:
    """Delete (or archive, or keep) a compacted shard's journal segments; returns how many went.

    Call only once the compacted shard is committed and checked: it then holds every done key.
    Archiving moves segments under ``OUT/_journal_archive/<shard>/`` (same names).
    """
    if mode not in AFTER_COMPACT:
        raise ValueError(f"journal mode {mode!r}: choose from {', '.join(AFTER_COMPACT)}")
    if mode == "keep":
        return 0
    uris = segment_uris(out, shard)
    for uri in uris:
        if mode == "archive":
            name = uri.rsplit("/", 1)[-1]
            storage.write_bytes(storage.join(out, ARCHIVE_DIR, shard, name), storage.read_bytes(uri))
        fs, path = storage.filesystem(uri)
        fs.rm(path)
    return len(uris)
