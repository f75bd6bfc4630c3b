"""Parquet datasets of atomically committed shards (:class:`Dataset`, :class:`ShardWriter`).

See the package docstring (:mod:`octomed_data.storage`) for the layout and the two-step commit.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from octomed_data.errors import StorageError
from octomed_data.storage.files import (
    check_fence,
    exists,
    filesystem,
    is_local,
    join,
    protocol_of,
    read_json,
    remove_quietly,
    wrap,
    write_json,
)

MANIFEST_DIR = "_manifest"
SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class ShardInfo:
    """A committed shard as the manifest records it."""

    shard: str
    file: str  # file name inside the dataset folder
    rows: int
    bytes: int
    committed_at: float
    extra: dict[str, Any]


class ShardWriter:
    """Streams rows into one shard, committed by :meth:`commit`.

    The one shard writer: :meth:`Dataset.write_shard` and every stage use it, so the commit
    (file, then manifest marker) is written once. Rows beyond the schema are dropped; missing
    columns are null.

    Memory is bounded whatever the rows hold: rows are buffered only up to ``rows_per_group``
    rows or ``bytes_per_group`` bytes of text, then written as one Parquet row group to a local
    spill file (hidden, beside the dataset on a local file system; in the temp folder for object
    stores). :meth:`commit` publishes it atomically: a rename on a local file system, one upload
    on object stores (an object is visible only once complete). A writer dropped without a
    commit removes its spill file.
    """

    def __init__(
        self,
        dataset: Dataset,
        shard: int | str,
        rows_per_group: int = 2048,
        bytes_per_group: int = 16 * 2**20,
    ) -> None:
        if dataset.schema is None:
            raise ValueError("a shard writer needs a schema")
        self.dataset = dataset
        self.shard = dataset.shard_name(shard)
        self.schema = dataset.schema
        self.target = dataset.file_uri(self.shard)
        self.fs, self.path = filesystem(self.target)
        if is_local(self.fs):
            folder = os.path.dirname(self.path) or "."
            wrap(self.target, os.makedirs, folder, exist_ok=True)
        else:
            folder = None  # the system temp folder
        fd, self.spill = tempfile.mkstemp(prefix=f".part-{self.shard}.parquet.", suffix=".tmp", dir=folder)
        os.close(fd)
        # Not committed (an exception, a dropped writer): the spill file goes with the writer.
        self._cleanup = weakref.finalize(self, remove_quietly, self.spill)
        self.writer = pq.ParquetWriter(self.spill, self.schema, compression="zstd")
        self.buffer: list[dict[str, Any]] = []
        self.buffered_bytes = 0
        self.rows = 0
        self.per_group = rows_per_group
        self.bytes_per_group = bytes_per_group

    def add(self, row: Mapping[str, Any]) -> None:
        values = {f.name: row.get(f.name) for f in self.schema}
        self.buffer.append(values)
        self.buffered_bytes += sum(len(v) for v in values.values() if isinstance(v, (str, bytes)))
        if len(self.buffer) >= self.per_group or self.buffered_bytes >= self.bytes_per_group:
            self.flush()

    def add_table(self, table: pa.Table) -> None:
        self.flush()
        table = table.select(self.schema.names).cast(self.schema)
        if table.num_rows:
            self.writer.write_table(table)
            self.rows += table.num_rows

    def flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.rows += len(self.buffer)
            self.buffer = []
            self.buffered_bytes = 0

    def commit(self, extra: Mapping[str, Any] | None = None) -> ShardInfo:
        """Publish the Parquet file atomically, then its manifest marker: the shard's done-signal."""
        self.flush()
        self.writer.close()
        size = os.path.getsize(self.spill)
        # An earlier commit's marker goes first: a crash between the new file and the new marker
        # then leaves no marker (not done, re-run), never an old marker describing the new file.
        marker = self.dataset.marker_uri(self.shard)
        check_fence(self.target)  # a writer that lost the shard's lease publishes nothing
        if exists(marker):
            fs, path = filesystem(marker)
            wrap(marker, fs.rm, path)
        wrap(self.target, self._publish)
        self._cleanup.detach()
        info = ShardInfo(
            shard=self.shard,
            file=self.target.rsplit("/", 1)[-1],
            rows=self.rows,
            bytes=size,
            committed_at=time.time(),
            extra=dict(extra or {}),
        )
        check_fence(marker)
        write_json(marker, asdict(info))
        return info

    def _publish(self) -> None:
        if is_local(self.fs):
            with open(self.spill, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.spill, self.path)  # same folder: atomic
            return
        try:
            if protocol_of(self.target) in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
                self.fs.put_file(self.spill, self.path)  # one upload: visible only once complete
            else:
                tmp = posixpath.join(
                    posixpath.dirname(self.path), f".{posixpath.basename(self.path)}.{uuid.uuid4().hex}.tmp"
                )
                self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
                self.fs.put_file(self.spill, tmp)
                self.fs.mv(tmp, self.path)
        finally:
            remove_quietly(self.spill)

    def abort(self) -> None:
        """Drop what was written (no commit)."""
        self.writer.close()
        self._cleanup()


class Dataset:
    """A Parquet dataset at ``uri``: shards committed atomically, listed by a manifest."""

    def __init__(self, uri: str, schema: pa.Schema | None = None, file_prefix: str = "part") -> None:
        self.uri = uri.rstrip("/") if uri.endswith("/") and len(uri) > 1 else uri
        self.schema = schema
        # Shard files are ``<file_prefix>-<shard>.parquet``; a release names them after its split
        # (``train-<shard>.parquet``), the file pattern the Hugging Face hub reads splits from.
        if not SHARD_NAME.match(file_prefix):
            raise ValueError(f"invalid file prefix {file_prefix!r}")
        self.file_prefix = file_prefix

    def __repr__(self) -> str:
        return f"Dataset({self.uri!r})"

    @staticmethod
    def shard_name(shard: int | str) -> str:
        name = f"{shard:05d}" if isinstance(shard, int) else str(shard)
        if not SHARD_NAME.match(name):
            raise ValueError(f"invalid shard name {name!r}")
        return name

    def file_uri(self, shard: int | str) -> str:
        return join(self.uri, f"{self.file_prefix}-{self.shard_name(shard)}.parquet")

    def marker_uri(self, shard: int | str) -> str:
        return join(self.uri, MANIFEST_DIR, f"{self.shard_name(shard)}.json")

    def write_shard(
        self,
        shard: int | str,
        data: pa.Table | Sequence[Mapping[str, Any]],
        extra: Mapping[str, Any] | None = None,
    ) -> ShardInfo:
        """Commit one shard (replacing any earlier commit of the same shard)."""
        if isinstance(data, pa.Table) and self.schema is None:
            writer = Dataset(self.uri, data.schema, self.file_prefix).writer(shard)
        else:
            writer = self.writer(shard)
        if isinstance(data, pa.Table):
            writer.add_table(data)
        else:
            for row in data:
                writer.add(row)
        return writer.commit(extra)

    def writer(self, shard: int | str, rows_per_group: int = 2048) -> ShardWriter:
        """A streaming writer for one shard of this dataset (needs a schema)."""
        return ShardWriter(self, shard, rows_per_group)

    def manifest(self) -> dict[str, ShardInfo]:
        """Committed shards, by name, sorted."""
        fs, path = filesystem(self.uri)
        mdir = posixpath.join(path, MANIFEST_DIR) if "://" in self.uri else os.path.join(path, MANIFEST_DIR)
        if not wrap(self.uri, fs.exists, mdir):
            return {}
        out: dict[str, ShardInfo] = {}
        for p in sorted(wrap(self.uri, fs.ls, mdir, detail=False)):
            base = posixpath.basename(p)
            if not base.endswith(".json") or base.startswith("."):
                continue
            info = json.loads(wrap(self.uri, fs.cat_file, p))
            out[info["shard"]] = ShardInfo(**info)
        return dict(sorted(out.items()))

    def is_committed(self, shard: int | str) -> bool:
        return exists(self.marker_uri(shard))

    def shard_info(self, shard: int | str) -> ShardInfo | None:
        uri = self.marker_uri(shard)
        return ShardInfo(**read_json(uri)) if exists(uri) else None

    def num_rows(self) -> int:
        return sum(s.rows for s in self.manifest().values())

    def files(self) -> list[str]:
        """URIs of the committed shard files (what ``datasets.load_dataset`` should be given)."""
        return [join(self.uri, s.file) for s in self.manifest().values()]

    def read_shard(self, shard: int | str, columns: Sequence[str] | None = None) -> pa.Table:
        fs, path = filesystem(self.file_uri(shard))
        with wrap(self.uri, fs.open, path, "rb") as fh:
            return pq.read_table(fh, columns=list(columns) if columns else None)

    def iter_batches(
        self,
        batch_size: int = 4096,
        columns: Sequence[str] | None = None,
        shards: Sequence[str] | None = None,
        fill_missing: bool = False,
    ) -> Iterator[pa.RecordBatch]:
        """Stream committed shards batch by batch; memory stays bounded by one batch.

        ``fill_missing``: a requested column a shard does not have (written before the column
        existed) comes back as nulls instead of an error."""
        names = list(shards) if shards is not None else list(self.manifest())
        for name in names:
            fs, path = filesystem(self.file_uri(name))
            with wrap(self.uri, fs.open, path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                wanted = list(columns) if columns else None
                present = set(pf.schema_arrow.names)
                if not fill_missing or wanted is None or all(c in present for c in wanted):
                    yield from pf.iter_batches(batch_size=batch_size, columns=wanted)
                    continue
                for batch in pf.iter_batches(
                    batch_size=batch_size, columns=[c for c in wanted if c in present]
                ):
                    arrays = [batch.column(c) if c in present else pa.nulls(batch.num_rows) for c in wanted]
                    yield pa.RecordBatch.from_arrays(arrays, names=wanted)

    def iter_rows(
        self, batch_size: int = 4096, shards: Sequence[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        for batch in self.iter_batches(batch_size=batch_size, shards=shards):
            yield from batch.to_pylist()

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Read every committed shard (for small datasets and tests only)."""
        tables = [self.read_shard(s, columns) for s in self.manifest()]
        if not tables:
            if self.schema is None:
                raise StorageError(f"no committed shards in {self.uri}")
            schema = self.schema if not columns else pa.schema([self.schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables, promote_options="default")

    def drop_stale(self, keep: Sequence[str], owns: Callable[[str], bool] | None = None) -> list[str]:
        """Un-commit every committed shard not in ``keep`` (and, when given, ``owns(name)``).

        The one stale-shard cleaner: a stage whose input shards vanished, or a re-run that wrote
        fewer shards, calls this so re-runs never leave stale rows behind.
        """
        wanted = set(keep)
        stale = [n for n in self.manifest() if n not in wanted and (owns is None or owns(n))]
        for name in stale:
            self.delete_shard(name)
        return stale

    def delete_shard(self, shard: int | str) -> None:
        """Un-commit a shard: marker first, so readers stop seeing it before the file goes."""
        for uri in (self.marker_uri(shard), self.file_uri(shard)):
            fs, path = filesystem(uri)
            if wrap(uri, fs.exists, path):
                wrap(uri, fs.rm, path)
