"""When a write's look for dead writers' temp files scans its local folder (:mod:`.files`).

A write's own look for leftovers scans its whole folder, and a run's busiest folders hold a few
files per shard (``state/<stage>/``, a dataset's folder and its ``_manifest/``): a scan per write
made a pass quadratic in shards (20 ms a scan of 30,000 entries, several per shard). A folder of
more than :data:`SMALL_FOLDER` entries is scanned again by a write only once
:data:`SCAN_EVERY_S_PER_ENTRY` times its size has passed since this process last scanned it
(30 s for 30,000 entries: the scans then cost well under 1% of a pass); a smaller folder on every
write. Each pass's cleaner (:meth:`~octomed_data.storage.Dataset.drop_stale`) still scans every
dataset folder.
"""

from __future__ import annotations

import os
import threading
import time

SMALL_FOLDER = 1000
SCAN_EVERY_S_PER_ENTRY = 0.001
SCANS: dict[str, tuple[float, int]] = {}  # folder -> (time.monotonic() of the last scan, entries)
SCANS_LOCK = threading.Lock()


def scan_due(folder: str) -> bool:
    """Whether a write's look for leftovers in local ``folder`` should scan it now."""
    with SCANS_LOCK:
        last = SCANS.get(os.path.abspath(folder))
    if last is None:
        return True
    at, entries = last
    return entries <= SMALL_FOLDER or time.monotonic() - at >= entries * SCAN_EVERY_S_PER_ENTRY


def scanned(folder: str, entries: int) -> None:
    """Note that ``folder`` was just scanned and held ``entries`` entries."""
    with SCANS_LOCK:
        if len(SCANS) > 4096:  # one entry per folder written: bounded all the same
            SCANS.clear()
        SCANS[os.path.abspath(folder)] = (time.monotonic(), entries)


def forget_scans() -> None:
    """Forget every scan: the next write in any folder scans it."""
    with SCANS_LOCK:
        SCANS.clear()
