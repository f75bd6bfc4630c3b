"""The one storage layer: Parquet datasets of atomically committed shards behind fsspec URIs.

A *dataset* is a folder ``URI`` holding ``part-<shard>.parquet`` files and a manifest folder
``URI/_manifest/`` with one JSON marker per committed shard (file, row count, bytes). A shard
is committed in two steps: the Parquet file is written atomically (temp file + rename on
filesystems that rename atomically; a single PUT on object stores, which makes an object
visible only once complete), then its marker is written the same way. Readers go by the
manifest, so they never see a half-written shard, and re-writing a shard replaces it, so a
re-run never duplicates rows. Folders starting with ``_`` or ``.`` are ignored by
``pyarrow.dataset`` and by the ``*.parquet`` glob that ``datasets.load_dataset`` is given.

URIs: a plain path or ``file://`` (default), ``s3://bucket/prefix`` through s3fs against any
S3-compatible endpoint, or ``memory://`` (tests). S3 endpoint and credentials come from the
environment (``OCTOMED_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``; ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` read by botocore itself) or from :func:`configure`, never from code.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import posixpath
import re
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from octomed_data.errors import StorageError

MANIFEST_DIR = "_manifest"
SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

_configured: dict[str, dict[str, Any]] = {}
_lock = threading.Lock()


def configure(protocol: str, **options: Any) -> None:
    """Set storage options for a protocol (e.g. ``configure("s3", endpoint_url=...)``)."""
    with _lock:
        _configured[protocol] = dict(options)


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec storage options for ``uri``: configuration first, then the environment.

    Returns a fresh dict on every call (``datasets.load_dataset`` mutates what it is given).
    """
    proto = protocol_of(uri)
    if proto in ("s3", "s3a"):
        opts: dict[str, Any] = {}
        endpoint = os.environ.get("OCTOMED_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        # Fail fast on an unreachable endpoint instead of retrying for minutes.
        opts["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}
        opts.update(_configured.get("s3", {}))
        return opts
    return dict(_configured.get(proto, {}))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the protocol-less path of ``uri``."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open storage URI {uri!r}: {exc}") from None
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (always with ``/``)."""
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return f"{proto}://" + posixpath.join(rest.rstrip("/"), *parts) if rest else uri
    return os.path.join(uri, *parts)


def absolute_uri(uri: str) -> str:
    """The one rule for a location written into a row (an image, an input file): absolute.

    A local path or ``file://`` URI becomes an absolute, normalised path, so the data reads the
    same from any working directory; other URIs (``s3://`` ...) are absolute already.
    """
    if protocol_of(uri) == "file":
        local = uri.removeprefix("file://")
        return os.path.normpath(os.path.abspath(os.path.expanduser(local)))
    return uri


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Re-attach the protocol to a path returned by ``fs``."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path}"


def describe_error(uri: str, exc: BaseException) -> str:
    """One line saying why ``uri`` could not be used (no traceback, no secrets)."""
    name = type(exc).__name__
    msg = str(exc).splitlines()[0] if str(exc) else name
    if "Could not connect" in msg or "EndpointConnectionError" in name or "Connect" in name:
        return f"cannot reach the storage endpoint for {uri}: {msg}"
    if isinstance(exc, PermissionError) or "AccessDenied" in msg or "InvalidAccessKeyId" in msg:
        return f"access denied to {uri}: {msg}"
    if "NoCredentials" in name or "Unable to locate credentials" in msg:
        return f"no credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in msg:
        return f"not found: {uri} ({msg})"
    return f"storage error on {uri}: {name}: {msg}"


def _wrap(uri: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except StorageError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise StorageError(describe_error(uri, exc)) from exc
    except Exception as exc:  # botocore / aiohttp errors are not OSError subclasses
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs"):
            raise StorageError(describe_error(uri, exc)) from exc
        raise


def _atomic_put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    parent = posixpath.dirname(path) if "/" in path else ""
    if protocol_of(to_uri(fs, path)) in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        # Object stores publish an object only when its upload completes: a PUT is atomic.
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    if parent:
        fs.makedirs(parent, exist_ok=True)
    # Hidden and not ending in .parquet: no reader or "*.parquet" glob picks up a half-written file.
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    if fs.protocol in ("file", "local") or "file" in fs.protocol:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: readers see the old object or the new, never half."""
    fs, path = filesystem(uri)
    _wrap(uri, _atomic_put, fs, path, data)


def update_digest(digest: Any, uri: str, chunk: int = 8 * 2**20) -> None:
    """Feed the bytes at ``uri`` to a hashlib ``digest`` in chunks (bounded memory)."""
    fs, path = filesystem(uri)
    with _wrap(uri, fs.open, path, "rb") as fh:
        while block := _wrap(uri, fh.read, chunk):
            digest.update(block)


def create_exclusive(uri: str, data: bytes) -> bool | None:
    """Write ``data`` only if nothing is at ``uri``: True written, False something was there.

    Exclusive on a local file system (``link()``) and on S3 (a conditional PUT, ``If-None-Match``);
    the object appears complete or not at all.
    None when this store cannot write exclusively (the caller then writes, waits and reads back).
    """
    fs, path = filesystem(uri)
    if _local_path(fs):
        folder = os.path.dirname(path) or "."
        _wrap(uri, os.makedirs, folder, exist_ok=True)
        # Written whole to a hidden file, then linked into place: link() fails when the name exists,
        # and a reader never sees the file empty (an O_EXCL create is visible before its write).
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise StorageError(describe_error(uri, exc)) from exc
            return _create_excl(path, data)  # a mount without hard links (FUSE buckets, some NFS/SMB)
        finally:
            _remove_quietly(tmp)
        return True
    if protocol_of(uri) in ("s3", "s3a"):
        return bool(_wrap(uri, _s3_create, fs, path, data))
    return None


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _create_excl(path: str, data: bytes) -> bool:
    """``O_EXCL`` create, then write: exclusive, but briefly visible empty (readers must allow it)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return True


def _s3_create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    try:
        fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
    except (FileExistsError, OSError) as exc:
        if not isinstance(exc, FileExistsError) and "precondition" not in str(exc).lower():
            raise
        # Taken, or ours: a retried PUT whose first try succeeded but whose answer was lost gets
        # 412 too. The bytes say which (callers write something unique, e.g. their owner id).
        try:
            return bool(fs.cat_file(path) == data)
        except FileNotFoundError:
            return False
    return True


# ----------------------------------------------------------------------------------- write fences
# A shard's writer runs inside ``fenced(check)``: before each data write that could publish
# something (a journal segment, a shard's file and marker) ``check_fence(uri)`` calls ``check``,
# which raises when the writer no longer holds the shard's lease (another job took it over).
_FENCE: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "octomed_write_fence", default=None
)


@contextlib.contextmanager
def fenced(check: Callable[[str], None]) -> Iterator[None]:
    """Writes made in this context (and tasks/threads started from it) call ``check(uri)`` first."""
    token = _FENCE.set(check)
    try:
        yield
    finally:
        _FENCE.reset(token)


def check_fence(uri: str) -> None:
    """Raise if this context's writer has lost its right to write (no-op outside a fence)."""
    check = _FENCE.get()
    if check is not None:
        check(uri)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return _wrap(uri, fs.cat_file, path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return bool(_wrap(uri, fs.exists, path))


def list_prefixed(uri_prefix: str) -> list[str]:
    """URIs of the files whose path starts with ``uri_prefix`` (one prefix listing on object stores,
    not the whole folder's)."""
    fs, path = filesystem(uri_prefix)
    folder = uri_prefix.rsplit("/", 1)[0] if "/" in uri_prefix else "."
    found = _wrap(uri_prefix, fs.glob, glob_escape(path) + "*")
    return sorted(join(folder, posixpath.basename(p.rstrip("/"))) for p in found)


def glob_escape(path: str) -> str:
    """``path`` with glob magic characters escaped."""
    return re.sub(r"([*?\[\]])", r"[\1]", path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the visible files directly in folder ``uri`` (sorted; hidden names skipped)."""
    fs, path = filesystem(uri)
    if not _wrap(uri, fs.exists, path):
        return []
    names = sorted(
        posixpath.basename(p.rstrip("/"))
        for p in _wrap(uri, fs.ls, path, detail=False)
        if p.rstrip("/").endswith(suffix)
    )
    return [join(uri, n) for n in names if not n.startswith((".", "_"))]


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def ensure_writable(uri: str) -> None:
    """Check early that ``uri`` can be written (bucket exists, endpoint reachable, path creatable)."""
    fs, path = filesystem(uri)
    if protocol_of(uri) in ("s3", "s3a"):
        bucket = path.split("/", 1)[0]
        if len(bucket) < 3:
            raise StorageError(f"invalid bucket name in {uri!r}")
        try:
            # A listing tells "endpoint unreachable" apart from "no such bucket" (exists() can't).
            fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            raise StorageError(f"bucket {bucket!r} does not exist at the configured S3 endpoint") from None
        except Exception as exc:  # botocore/aiohttp errors are not OSError subclasses
            raise StorageError(describe_error(uri, exc)) from None
        return
    _wrap(uri, fs.makedirs, path, exist_ok=True)


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


def _local_path(fs: fsspec.AbstractFileSystem) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


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
        if _local_path(self.fs):
            folder = os.path.dirname(self.path) or "."
            _wrap(self.target, os.makedirs, folder, exist_ok=True)
        else:
            folder = None  # the system temp folder
        fd, self.spill = tempfile.mkstemp(prefix=f".part-{self.shard}.parquet.", suffix=".tmp", dir=folder)
        os.close(fd)
        # Not committed (an exception, a dropped writer): the spill file goes with the writer.
        self._cleanup = weakref.finalize(self, _remove_quietly, self.spill)
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
            _wrap(marker, fs.rm, path)
        _wrap(self.target, self._publish)
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
        if _local_path(self.fs):
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
            _remove_quietly(self.spill)

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
        if not _wrap(self.uri, fs.exists, mdir):
            return {}
        out: dict[str, ShardInfo] = {}
        for p in sorted(_wrap(self.uri, fs.ls, mdir, detail=False)):
            base = posixpath.basename(p)
            if not base.endswith(".json") or base.startswith("."):
                continue
            info = json.loads(_wrap(self.uri, fs.cat_file, p))
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
        with _wrap(self.uri, fs.open, path, "rb") as fh:
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
            with _wrap(self.uri, fs.open, path, "rb") as fh:
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
            if _wrap(uri, fs.exists, path):
                _wrap(uri, fs.rm, path)
