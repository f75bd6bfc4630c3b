"""The durable request journal: append-only compressed segments, one small immutable object each.

``FOLDER/_journal/<shard>/<time>-<uuid>.jsonl.zst`` holds finished requests (and requests that
failed after all attempts) as JSON lines in one zstd frame (``zstd -d`` reads it; plain ``.jsonl``
segments of older runs are still read). Segments are written whole through the storage layer
(atomic rename on file systems, a single PUT on object stores), so a kill at any moment leaves
either the whole segment or nothing, and the same code works on S3. A record counts as done only
once its segment is written; on restart the journal says which keys are done. Distillation, the
LLM judge and difficulty grading journal through :class:`JournalWriter` (via
:class:`~octomed_data.inference.processor.RequestProcessor`).
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
from octomed_data.layout import journal_dir

SEGMENT_SUFFIX = ".jsonl.zst"
LEGACY_SUFFIX = ".jsonl"
FAILED = "request_failed"  # reject_reason of a record whose request failed after all attempts


def journal_uri(out: str, shard: str) -> str:
    return journal_dir(out, shard)


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


class JournalWriter:
    """Buffers finished records and writes them as one segment every ``every`` rows or ``interval_s``.

    One writer task writes segments in order, off the event loop (storage calls block). After
    each segment is durable it calls ``on_durable(stored, failed)``: that, not :meth:`add`, is
    when a record counts as done. Callers do not wait for it, so a slow store never holds
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
        """Queue one finished (or finally failed) record for the next segment."""
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
