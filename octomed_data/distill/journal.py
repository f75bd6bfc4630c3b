"""The durable sample journal: append-only compressed segments, one small immutable object each.

``OUT/_journal/<shard>/<time>-<uuid>.jsonl.zst`` holds finished samples (and samples that failed
after all attempts) as JSON lines in one zstd frame (``zstd -d`` reads it; plain ``.jsonl``
segments of older runs are still read). Segments are written whole through the storage layer
(atomic rename on file systems, a single PUT on object stores), so a kill at any moment leaves
either the whole segment or nothing, and the same code works on S3. A sample counts as done only
once its segment is written; on restart the journal says which sample keys are done.

Compressed, the journal stays within about the size of the Parquet it is compacted into (JSON
keys repeat in every line; zstd takes them out). Once a shard is compacted and the committed
file checked, the engine deletes (or archives) its segments: the committed raw shard then holds
the done keys (:func:`read_done_keys` reads both).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson
import pyarrow as pa

from octomed_data import storage
from octomed_data.schema import SAMPLE_SCHEMA

RAW_DIR = "raw"  # the compacted, committed samples: OUT/raw (the shard's done-signal)
JOURNAL_DIR = "_journal"
ARCHIVE_DIR = "_journal_archive"
SEGMENT_SUFFIX = ".jsonl.zst"
LEGACY_SUFFIX = ".jsonl"
# After a shard is compacted: delete its segments, move them to ARCHIVE_DIR, or leave them.
AFTER_COMPACT = ("delete", "archive", "keep")
FAILED = "request_failed"  # reject_reason of a sample whose request failed after all attempts


def sample_key(question_id: str, model: str, prompt_version: str, params_hash: str, sample_idx: int) -> str:
    """The identity of one sample: re-running with the same key must not pay for it again."""
    return f"{question_id}|{model}|{prompt_version}|{params_hash}|{sample_idx}"


def row_key(row: dict[str, Any]) -> str:
    return sample_key(
        row["question_id"], row["model"], row["prompt_version"], row["params_hash"], int(row["sample_idx"])
    )


def journal_uri(out: str, shard: str) -> str:
    return storage.join(out, JOURNAL_DIR, shard)


def segment_uris(out: str, shard: str) -> list[str]:
    """Committed journal segments of a shard, oldest first (names start with a time stamp)."""
    uris = storage.list_files(journal_uri(out, shard))
    return [u for u in uris if u.endswith((SEGMENT_SUFFIX, LEGACY_SUFFIX))]


def encode_segment(rows: Iterable[bytes]) -> bytes:
    """JSON lines (already encoded, one per row) as one zstd frame."""
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as stream:
        stream.write(b"".join(rows))
    return sink.getvalue().to_pybytes()


def decode_segment(uri: str, data: bytes) -> bytes:
    if uri.endswith(SEGMENT_SUFFIX):
        return pa.CompressedInputStream(pa.BufferReader(data), "zstd").read()
    return data


def iter_journal(out: str, shard: str) -> Iterator[dict[str, Any]]:
    """Every record of every segment, segment by segment (memory: one segment)."""
    for uri in segment_uris(out, shard):
        for line in decode_segment(uri, storage.read_bytes(uri)).splitlines():
            if line.strip():
                yield orjson.loads(line)


def raw_uri(out: str) -> str:
    return storage.join(out, RAW_DIR)


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


class JournalWriter:
    """Buffers finished samples and writes them as one segment every ``every`` rows or ``interval_s``.

    One writer task writes segments in order, off the event loop (storage calls block). After
    each segment is durable it calls ``on_durable(stored, failed)``: that, not :meth:`add`, is
    when a sample counts as done. Callers do not wait for it, so a slow store never holds
    request slots.
    """

    def __init__(
        self,
        out: str,
        shard: str,
        every: int = 256,
        interval_s: float = 0.5,
        on_durable: Callable[[int, int], None] | None = None,
    ) -> None:
        self._uri = journal_uri(out, shard)
        self._every = every
        self._interval = interval_s
        self._on_durable = on_durable
        self._lines: list[bytes] = []
        self._stored = 0
        self._failed = 0
        self._wake = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.segments = 0
        self.rows = 0

    def start(self) -> JournalWriter:
        self._task = asyncio.create_task(self._run())
        return self

    def add(self, row: dict[str, Any]) -> None:
        """Queue one finished (or finally failed) sample for the next segment."""
        if self._task is not None and self._task.done() and self._task.exception() is not None:
            raise self._task.exception()  # type: ignore[misc]  # the store failed: stop the shard
        self._lines.append(orjson.dumps(row, default=str) + b"\n")
        if row.get("reject_reason") == FAILED:
            self._failed += 1
        else:
            self._stored += 1
        if len(self._lines) >= self._every:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self._flush()
            if self._closed and not self._lines:
                return

    async def _flush(self) -> None:
        if not self._lines:
            return
        lines, stored, failed = self._lines, self._stored, self._failed
        self._lines, self._stored, self._failed = [], 0, 0
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{SEGMENT_SUFFIX}"
        await asyncio.to_thread(self._write, storage.join(self._uri, name), lines)
        self.segments += 1
        self.rows += len(lines)
        if self._on_durable is not None:
            self._on_durable(stored, failed)

    @staticmethod
    def _write(uri: str, lines: list[bytes]) -> None:
        storage.check_fence(uri)  # a writer that lost the shard's lease stops here
        storage.write_bytes(uri, encode_segment(lines))  # compressed off the event loop too

    async def close(self) -> None:
        """Flush what is buffered and stop the writer (raises if a segment could not be written)."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
