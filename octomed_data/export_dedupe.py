"""The export's duplicate check with memory bounded in bytes: the keys of the rows written so far.

:class:`SeenKeys` answers "was this key added before?" exactly, like a Python ``set``, but holds at
most ``limit_bytes`` of keys in memory (a set costs ~90 bytes per 16-byte key). When the set is
full its keys move, sorted, into an on-disk SQLite table (a local temporary file, whatever store the
export writes to) and the set starts again; a key not in the set is looked up there. So the same
rows come out whatever the limit, and an export of the paper's ~8M rows holds a few MB of keys
instead of ~700 MB. The limit comes from the one memory setting, ``mixture.memory_mb``
(:func:`dedupe_limit_bytes`).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from types import TracebackType

from octomed_data.mixture_config import MixtureConfig

KEY_COST_BYTES = 96  # measured: a set of 16-byte ``bytes`` keys costs ~91 bytes per key (tracemalloc)
DEDUPE_SHARE = 8  # the seen keys may take 1/8 of memory_mb; the rest is one shard's rows in flight
DEFAULT_MEMORY_MB = MixtureConfig.model_fields["memory_mb"].default  # a mixture without its summary


def dedupe_limit_bytes(memory_mb: float) -> int:
    """The bytes of keys the export keeps in memory under ``memory_mb`` (at least one key)."""
    return max(KEY_COST_BYTES, int(memory_mb * 2**20 / DEDUPE_SHARE))


class SeenKeys:
    """An exact set of keys (``bytes``) holding at most ``limit_bytes`` of them in memory, the rest
    in an on-disk table. Use as a context manager (or :meth:`close`) to remove the file."""

    def __init__(self, limit_bytes: int) -> None:
        self.max_in_memory = max(1, limit_bytes // KEY_COST_BYTES)
        self.memory: set[bytes] = set()
        self.spilled = 0  # keys on disk
        self.spills = 0
        self.folder: str | None = None
        self.db: sqlite3.Connection | None = None

    def add(self, key: bytes) -> bool:
        """Add ``key``; True when it is new (not added before), False for a duplicate."""
        if key in self.memory:
            return False
        if self.db is not None and self.db.execute("SELECT 1 FROM seen WHERE k = ?", (key,)).fetchone():
            return False
        self.memory.add(key)
        if len(self.memory) >= self.max_in_memory:
            self.spill()
        return True

    def __len__(self) -> int:
        return len(self.memory) + self.spilled

    def spill(self) -> None:
        """Move the keys in memory to the on-disk table."""
        if not self.memory:
            return
        if self.db is None:
            self.folder = tempfile.mkdtemp(prefix="octomed-export-keys-")
            self.db = sqlite3.connect(f"{self.folder}/seen.sqlite", isolation_level=None)
            for pragma in (
                "journal_mode = OFF",
                "synchronous = OFF",
                "cache_size = -4096",
                "temp_store = FILE",
            ):
                self.db.execute(f"PRAGMA {pragma}")
            self.db.execute("CREATE TABLE seen (k BLOB PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO seen VALUES (?)", ((k,) for k in sorted(self.memory)))
        self.db.execute("COMMIT")
        self.spilled += len(self.memory)
        self.spills += 1
        self.memory = set()  # a new set: clear() keeps the old table's size

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> SeenKeys:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
