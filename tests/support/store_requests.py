"""Counting the HTTP requests this process sends to an S3-compatible store (the loopback server)."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

from octomed_data import storage


@contextlib.contextmanager
def s3_requests(uri: str) -> Iterator[Counter]:
    """While the block runs, count every request the store's s3fs client sends (retries included),
    by operation (``ListObjectsV2``, ``GetObject``, ``HeadObject`` ...); ``counter.total()``: all."""
    fs, _ = storage.filesystem(uri)
    counts: Counter = Counter()
    lock = threading.Lock()

    def count(request=None, **kwargs) -> None:
        op = kwargs.get("event_name", "").rsplit(".", 1)[-1] or "request"
        with lock:
            counts[op] += 1

    events = fs.s3.meta.events
    events.register("before-send.s3", count, unique_id="octomed-count-requests")
    try:
        yield counts
    finally:
        events.unregister("before-send.s3", unique_id="octomed-count-requests")
