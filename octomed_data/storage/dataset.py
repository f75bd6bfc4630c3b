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
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from octomed_data.errors import StorageError
from octomed_data.storage.fences import check_fence, in_fence
from octomed_data.storage.files import (
    UnreadableFile,
    clean_temp_files,
    describe_error,
    exists,
    filesystem,
    is_local,
    join,
    one_get,
    protocol_of,
    read_bytes,
    remove_quietly,
    temp_name,
    temp_target,
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
            folder = tempfile.gettempdir()  # a local spill, uploaded in one PUT on commit
        # What earlier attempts at this shard left: their spills, a file without its marker.
        dataset.clean_shard(self.shard)
        base = self.target.rsplit("/", 1)[-1]
        self.spill = os.path.join(folder, temp_name(base if is_local(self.fs) else f"octomed-{base}"))
        # Not committed (an exception, a dropped writer): the spill file goes with the writer.
        self._cleanup = weakref.finalize(self, remove_quietly, self.spill)
        self.writer = self._guard(pq.ParquetWriter, self.spill, self.schema, compression="zstd")
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

    def _guard(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` with its errors (a full disk, ...) named after this shard's file, not a temp file."""
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            self._drop()  # a failed write leaves the writer unusable: its spill goes now
            raise StorageError(f"shard {self.shard}: {describe_error(self.target, exc)}") from exc

    def _drop(self) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            try:
                writer.close()
            except (OSError, ValueError, RuntimeError):
                pass
        self._cleanup()

    def add_table(self, table: pa.Table) -> None:
        self.flush()
        table = table.select(self.schema.names).cast(self.schema)
        if table.num_rows:
            self._guard(self.writer.write_table, table)
            self.rows += table.num_rows

    def flush(self) -> None:
        if self.buffer:
            self._guard(self.writer.write_table, pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.rows += len(self.buffer)
            self.buffer = []
            self.buffered_bytes = 0

    def commit(self, extra: Mapping[str, Any] | None = None) -> ShardInfo:
        """Publish the shard: its marker, then its Parquet file (atomically) as the commit point.

        A shard is committed when its marker AND the file the marker names exist
        (:meth:`Dataset.manifest`). The file goes in place last, so a file that readers see
        (``pyarrow.dataset``, a ``*.parquet`` glob) always has its marker, and a crash at any step
        leaves either the old commit, nothing, or a marker without its file (not committed, re-run).
        """
        self.flush()
        self._guard(self.writer.close)
        size = os.path.getsize(self.spill)
        marker = self.dataset.marker_uri(self.shard)
        info = ShardInfo(
            shard=self.shard,
            file=self.target.rsplit("/", 1)[-1],
            rows=self.rows,
            bytes=size,
            committed_at=time.time(),
            extra=dict(extra or {}),
        )
        check_fence(self.target)  # a writer that lost the shard's lease publishes nothing
        # An earlier commit's file goes first: its marker alone then commits nothing, and is never
        # taken for a description of the new file.
        if fresh_exists(self.target):
            wrap(self.target, self.fs.rm, self.path)
        check_fence(marker)
        self._guard(write_json, marker, asdict(info))
        check_fence(self.target)
        self._guard(self._publish)
        self._cleanup.detach()
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
                tmp = posixpath.join(posixpath.dirname(self.path), temp_name(posixpath.basename(self.path)))
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
        # ``<file_prefix>-<shard>.parquet``; a release's ``train-…``: the hub's split file pattern.
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
        """Committed shards by name, sorted: a marker whose file exists (a marker alone: unfinished)."""
        return self.committed(lambda info: info)

    def committed_names(self) -> list[str]:
        """:meth:`manifest`'s names only (not every marker held parsed: ~4 KB a distill marker)."""
        return list(self.committed(lambda info: None))

    def committed(self, keep: Callable[[ShardInfo], Any]) -> dict[str, Any]:
        """:meth:`manifest` holding only ``keep(marker)`` of each committed shard."""
        return dict(sorted(self._committed(keep)))

    def is_committed(self, shard: int | str) -> bool:
        return self.shard_info(shard) is not None

    def has_committed(self) -> bool:
        """Whether any shard is committed (markers read up to the first committed one)."""
        return next(self._committed(lambda info: None), None) is not None

    def _committed(self, keep: Callable[[ShardInfo], Any]) -> Iterator[tuple[str, Any]]:
        fs, path = filesystem(self.uri)
        mdir = posixpath.join(path, MANIFEST_DIR) if "://" in self.uri else os.path.join(path, MANIFEST_DIR)
        if not wrap(self.uri, fs.exists, mdir):
            return
        listed = sorted(wrap(self.uri, fs.ls, mdir, detail=False, refresh=True))
        fs.invalidate_cache(mdir)  # the names are enough: no per-object cache of the listing held
        present: set[str] | None = None  # the files, listed once, after the markers: a commit's last step
        for p in listed:
            base = posixpath.basename(p)
            if not base.endswith(".json") or base.startswith("."):
                continue
            uri = join(self.uri, MANIFEST_DIR, base)
            info = self._info(uri, wrap(uri, fs.cat_file, p, **one_get(fs)))
            present = self._file_names() if present is None else present
            if info.file in present:
                yield info.shard, keep(info)

    @staticmethod
    def _info(uri: str, data: bytes) -> ShardInfo:
        try:
            return ShardInfo(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise UnreadableFile(f"unreadable shard marker {uri}: {exc}") from None

    def _file_names(self, sub: str = "") -> set[str]:
        """Names in the dataset's folder (or its ``sub`` folder), listed fresh."""
        fs, path = filesystem(join(self.uri, sub) if sub else self.uri)
        try:
            listed = wrap(self.uri, fs.ls, path, detail=False, refresh=True)
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return set()
            raise
        return {posixpath.basename(str(p).rstrip("/")) for p in listed}

    def shard_info(self, shard: int | str) -> ShardInfo | None:
        """The shard's marker when it is committed (its file exists too), else None."""
        uri = self.marker_uri(shard)
        if not exists(uri):
            return None
        try:
            info = self._info(uri, read_bytes(uri))
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):  # un-committed meanwhile
                return None
            raise
        return info if fresh_exists(join(self.uri, info.file)) else None

    def num_rows(self) -> int:
        return sum(self.committed(lambda info: info.rows).values())

    def files(self) -> list[str]:
        """URIs of the committed shard files (what ``datasets.load_dataset`` should be given)."""
        return list(self.committed(lambda info: join(self.uri, info.file)).values())

    def read_shard(self, shard: int | str, columns: Sequence[str] | None = None) -> pa.Table:
        uri = self.file_uri(shard)
        fs, path = filesystem(uri)

        def read() -> pa.Table:
            with fs.open(path, "rb") as fh:
                return pq.read_table(fh, columns=list(columns) if columns else None)

        return _named(uri, read)

    def iter_batches(
        self,
        batch_size: int = 4096,
        columns: Sequence[str] | None = None,
        shards: Sequence[str] | None = None,
        fill_missing: bool = False,
    ) -> Iterator[pa.RecordBatch]:
        """Stream committed shards batch by batch (memory bounded by one batch). ``fill_missing``: a
        requested column a shard lacks (written before it existed) comes back as nulls, no error."""
        names = list(shards) if shards is not None else self.committed_names()
        for name in names:
            uri = self.file_uri(name)
            batches = self._file_batches(uri, batch_size, columns, fill_missing)
            try:
                while (batch := _named(uri, next, batches, None)) is not None:
                    yield batch
            finally:
                batches.close()

    @staticmethod
    def _file_batches(
        uri: str, batch_size: int, columns: Sequence[str] | None, fill_missing: bool
    ) -> Iterator[pa.RecordBatch]:
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            wanted = list(columns) if columns else None
            present = set(pf.schema_arrow.names)
            if not fill_missing or wanted is None or all(c in present for c in wanted):
                yield from pf.iter_batches(batch_size=batch_size, columns=wanted)
                return
            for batch in pf.iter_batches(batch_size=batch_size, columns=[c for c in wanted if c in present]):
                arrays = [batch.column(c) if c in present else pa.nulls(batch.num_rows) for c in wanted]
                yield pa.RecordBatch.from_arrays(arrays, names=wanted)

    def iter_rows(
        self, batch_size: int = 4096, shards: Sequence[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        for batch in self.iter_batches(batch_size=batch_size, shards=shards):
            yield from batch.to_pylist()

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Read every committed shard (for small datasets and tests only)."""
        tables = [self.read_shard(s, columns) for s in self.committed_names()]
        if not tables:
            if self.schema is None:
                raise StorageError(f"no committed shards in {self.uri}")
            schema = self.schema if not columns else pa.schema([self.schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables, promote_options="default")

    def drop_stale(self, keep: Sequence[str], owns: Callable[[str], bool] | None = None) -> list[str]:
        """Un-commit every committed shard not in ``keep`` (and, when given, ``owns(name)``).

        The one stale-shard cleaner: a stage whose input shards vanished, or a re-run that wrote
        fewer shards, calls this so re-runs never leave stale rows behind. It also clears what
        killed writers left (:meth:`clean_leftovers`).
        """
        wanted = set(keep)
        stale = [n for n in self.committed_names() if n not in wanted and (owns is None or owns(n))]
        for name in stale:
            self.delete_shard(name)
        self.clean_leftovers(owns)
        return stale

    def delete_shard(self, shard: int | str) -> None:
        """Un-commit a shard: its file first (readers stop seeing it; the marker alone commits
        nothing), then its marker."""
        for uri in (self.file_uri(shard), self.marker_uri(shard)):
            fs, path = filesystem(uri)
            if wrap(uri, fs.exists, path):
                wrap(uri, fs.rm, path)

    # ------------------------------------------------------------------ leftovers of killed writers
    def _shard_of_file(self, name: str) -> str | None:
        head, tail = f"{self.file_prefix}-", ".parquet"
        if name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail):
            shard = name[len(head) : -len(tail)]
            return shard if SHARD_NAME.match(shard) else None
        return None

    def _remove_orphan(self, shard: str) -> bool:
        """Remove ``shard``'s file if no marker commits it (a writer killed before the marker
        existed). Safe beside a live writer: a writer puts the marker before the file and takes
        the file away before the marker, so a file seen first and then no marker is an orphan."""
        uri = self.file_uri(shard)
        if not fresh_exists(uri) or fresh_exists(self.marker_uri(shard)):
            return False
        fs, path = filesystem(uri)
        try:
            wrap(uri, fs.rm, path)
        except StorageError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
        return True

    def clean_shard(self, shard: str) -> list[str]:
        """Before a shard is written: remove what earlier attempts at it left behind (its file
        without a marker; spill and temp files of dead writers; under the shard's lease, every
        other writer's spill of this shard, since that writer lost the lease)."""
        removed = [self.file_uri(shard)] if self._remove_orphan(shard) else []
        target = self.file_uri(shard).rsplit("/", 1)[-1]
        marker = f"{shard}.json"
        fenced = in_fence()
        mine = os.getpid()

        def ours(name: str) -> bool:
            return fenced and temp_target(name) == target and f"~{mine}~" not in name

        fs, _ = filesystem(self.uri)
        if is_local(fs):  # each shard's look: a big folder only once in a while (files.scan_due)
            removed += clean_temp_files(self.uri, ours)
            removed += clean_temp_files(
                join(self.uri, MANIFEST_DIR), lambda n: fenced and temp_target(n) == marker
            )
        else:
            removed += clean_temp_files(tempfile.gettempdir(), only=lambda n: n.startswith(".octomed-"))
        return removed

    def clean_leftovers(self, owns: Callable[[str], bool] | None = None) -> list[str]:
        """Remove every leftover of killed writers (shard files without a marker, dead writers'
        spill and temp files); ``owns(shard)`` limits it to this writer's shards."""
        fs, path = filesystem(self.uri)
        names = self._file_names()  # the files first, then the markers: see _remove_orphan
        markers = self._file_names(MANIFEST_DIR) if names else set()
        removed = []
        for name in sorted(names):
            shard = self._shard_of_file(name)
            if shard is None or f"{shard}.json" in markers or (owns is not None and not owns(shard)):
                continue
            if self._remove_orphan(shard):  # asked again of the store, one by one
                removed.append(join(self.uri, name))
        if is_local(fs):
            removed += clean_temp_files(self.uri, when_due=False)
            removed += clean_temp_files(join(self.uri, MANIFEST_DIR), when_due=False)
        return removed


def fresh_exists(uri: str) -> bool:
    """Whether ``uri`` exists, asked of the store (not of a folder listing this process cached)."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(posixpath.dirname(path))
    return bool(wrap(uri, fs.exists, path))


def _named(uri: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with a storage or Parquet error turned into a one-line error naming ``uri``."""
    try:
        return fn(*args)
    except StorageError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:  # ArrowInvalid is a ValueError
        name = type(exc).__module__.split(".")[0]
        if name == "pyarrow" and not isinstance(exc, OSError | FileNotFoundError):
            raise UnreadableFile(f"not a readable Parquet file: {uri} ({str(exc).splitlines()[0]})") from exc
        raise StorageError(describe_error(uri, exc)) from exc
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs"):
            raise StorageError(describe_error(uri, exc)) from exc
        raise
