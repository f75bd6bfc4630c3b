"""The durable sample journal: append-only JSON-lines segments, one small immutable object each.

``OUT/_journal/<shard>/<time>-<uuid>.jsonl`` holds finished samples (and samples that failed
after all attempts). Segments are written whole through the storage layer (atomic rename on
file systems, a single PUT on object stores), so a kill at any moment leaves either the whole
segment or nothing, and the same code works on S3. A sample counts as done only once its
segment is written; on restart the journal says which sample keys are done.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from octomed_data import storage

JOURNAL_DIR = "_journal"
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
    return storage.list_files(journal_uri(out, shard), suffix=".jsonl")


def iter_journal(out: str, shard: str) -> Iterator[dict[str, Any]]:
    """Every record of every segment, segment by segment (memory: one segment)."""
    for uri in segment_uris(out, shard):
        for line in storage.read_bytes(uri).splitlines():
            if line.strip():
                yield json.loads(line)


def read_done_keys(out: str, shard: str) -> tuple[set[str], set[str]]:
    """(keys stored as finished samples, keys whose last record is a failure)."""
    done: set[str] = set()
    failed: set[str] = set()
    for rec in iter_journal(out, shard):
        key = row_key(rec)
        if rec.get("reject_reason") == FAILED:
            failed.add(key)
        else:
            done.add(key)
    return done, failed - done


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
        self._lines: list[str] = []
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
        self._lines.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
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
        data = ("\n".join(lines) + "\n").encode("utf-8")
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.jsonl"
        await asyncio.to_thread(storage.write_bytes, storage.join(self._uri, name), data)
        self.segments += 1
        self.rows += len(lines)
        if self._on_durable is not None:
            self._on_durable(stored, failed)

    async def close(self) -> None:
        """Flush what is buffered and stop the writer (raises if a segment could not be written)."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
