"""One pass's look at a dataset's committed markers (:class:`MarkerView`), held compactly.

A pass over N shards holds the markers of the datasets it asks about (a stage's input and done
datasets) for the whole pass: ~0.5-1 KB of JSON each, most of it the same keys and texts in every
marker of a dataset. Each marker is kept as its compact JSON deflated against the first marker
of the same look (a preset dictionary): ~70-150 bytes a marker instead of ~700, inflated and
parsed again on each question (a few microseconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import sys
import threading
import zlib
from collections.abc import Iterator
from typing import Any

from octomed_data import storage
from octomed_data.errors import StorageError

MARKERS_PER_CALL = 256  # markers a pass's look reads per store call
MARKER_READS_AT_ONCE = 32  # of which at most this many requests at once (object stores)


class Packer:
    """Compact JSON documents deflated against the first one packed (a preset dictionary, so
    each costs only what differs from it); :meth:`unpack` gives the document back."""

    def __init__(self) -> None:
        self.zdict = b""
        self.wbits = -12  # raw deflate, a 4 KB window: the dictionary and a document fit in it

    def pack(self, doc: Any) -> bytes:
        text = json.dumps(doc, separators=(",", ":")).encode()
        if not self.zdict:
            self.zdict = text
            self.wbits = -12 if len(text) <= 3000 else -15
        packer = zlib.compressobj(6, zlib.DEFLATED, self.wbits, 1, zlib.Z_DEFAULT_STRATEGY, self.zdict)
        return packer.compress(text) + packer.flush()

    def unpack(self, data: bytes) -> Any:
        unpacker = zlib.decompressobj(self.wbits, self.zdict)
        return json.loads(unpacker.decompress(data) + unpacker.flush())


class MarkerView:
    """One pass's look at a dataset, read as :meth:`storage.Dataset.manifest` reads it (a shard
    is committed when its marker and the file it names both exist) but once: its marker folder
    and its data folder listed once, and, on the first question about a marker, every marker
    read once (many at a time on an object store). Answers ``shard_info`` and the committed
    names with no further request. A pass (:func:`~.local.run_stage`) takes one per dataset it
    asks about and drops it before shards run, so it never goes stale there."""

    def __init__(self, dataset: storage.Dataset) -> None:
        self.dataset = dataset
        self.uri = dataset.uri
        self._fs, self._path = storage.filesystem(dataset.uri)
        self._sep = posixpath if "://" in dataset.uri else os.path
        self._mdir = self._sep.join(self._path, storage.MANIFEST_DIR)
        # the shards with a marker (names interned: the same strings as every other list of them)
        markers = [
            sys.intern(n.removesuffix(".json"))
            for n in self._list(self._mdir)
            if n.endswith(".json") and not n.startswith(".")
        ]
        self._files = set(self._list(self._path)) if markers else set()
        self._markers = markers
        self._names: list[str] | None = None
        # shard -> committed marker, packed (parsed, ~5x the bytes of its JSON: a pass over
        # 10,000 shards holds every marker of two datasets at once)
        self._infos: dict[str, bytes] | None = None
        self._packer = Packer()
        self._lock = threading.Lock()

    def _list(self, folder: str) -> list[str]:
        try:
            listed = storage.wrap(self.uri, self._fs.ls, folder, detail=False, refresh=True)
        except (FileNotFoundError, StorageError) as exc:
            if isinstance(exc, FileNotFoundError) or isinstance(exc.__cause__, FileNotFoundError):
                return []
            raise
        return sorted(posixpath.basename(str(p).rstrip("/")) for p in listed)

    def names(self) -> list[str]:
        """The committed shards, from the two listings alone (a marker is ``<shard>.json``, its
        file the dataset's file name for the shard); a new list each call."""
        with self._lock:
            if self._names is None:
                self._names = [n for n in self._markers if self._file_of(n) in self._files]
            return list(self._names)

    def _file_of(self, shard: str) -> str:
        try:
            return posixpath.basename(self.dataset.file_uri(shard))
        except ValueError:  # not a shard name this dataset would write
            return ""

    def infos(self) -> dict[str, bytes]:
        """Every committed shard's marker (packed: :meth:`shard_info` unpacks one), read on the
        first question."""
        with self._lock:
            if self._infos is None:
                by_path = {self._sep.join(self._mdir, n + ".json"): n for n in self._markers}
                self._infos = {}
                for chunk in self._read(list(by_path)):  # packed chunk by chunk: never every marker as read
                    for path, data in chunk.items():
                        doc = self._parse(path, data)
                        if doc["file"] in self._files:
                            shard = by_path[path] if by_path.get(path) == doc["shard"] else doc["shard"]
                            self._infos[shard] = self._packer.pack(doc)
            return self._infos

    def _parse(self, path: str, data: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(data)
            storage.ShardInfo(**doc)  # what shard_info will build: fail here, naming the marker
            return doc
        except (ValueError, TypeError) as exc:
            raise StorageError(
                f"unreadable shard marker {self.uri} {posixpath.basename(path)}: {exc}"
            ) from None

    def _read(self, paths: list[str]) -> Iterator[dict[str, bytes]]:
        if not any(c in self._mdir for c in "*?["):  # fsspec would take those for a glob
            # A few hundred markers per call, a few dozen requests at once: memory stays flat in
            # shards (one call over every marker holds a request's state per marker at once).
            more = {"batch_size": MARKER_READS_AT_ONCE} if getattr(self._fs, "async_impl", False) else {}
            more |= storage.one_get(self._fs)
            for i in range(0, len(paths), MARKERS_PER_CALL):
                chunk = paths[i : i + MARKERS_PER_CALL]
                yield storage.wrap(self.uri, self._fs.cat, chunk, on_error="omit", **more)
            return
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                yield {p: storage.wrap(self.uri, self._fs.cat_file, p)}

    def shard_info(self, shard: str) -> storage.ShardInfo | None:
        data = self.infos().get(shard)
        return storage.ShardInfo(**self._packer.unpack(data)) if data is not None else None
