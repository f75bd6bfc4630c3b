"""Files behind fsspec URIs: reading, atomic and exclusive writes, listing (write fences: :mod:`.fences`).

URIs: a plain path or ``file://`` (default), ``s3://bucket/prefix`` through s3fs against any
S3-compatible endpoint, or ``memory://`` (tests). S3 endpoint and credentials come from the
environment (``OCTOMED_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``; ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` read by botocore itself) or from :func:`configure`, never from code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import fsspec

from octomed_data.errors import StorageError
from octomed_data.storage.scans import scan_due, scanned

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
        opts["use_listings_cache"] = False  # no listing kept for good (~1 KB/object; stale once written)
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
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device writing {uri}: {msg}"
    if "Could not connect" in msg or "EndpointConnectionError" in name or "Connect" in name:
        return f"cannot reach the storage endpoint for {uri}: {msg}"
    if isinstance(exc, PermissionError) or "AccessDenied" in msg or "InvalidAccessKeyId" in msg:
        return f"access denied to {uri}: {msg}"
    if "NoCredentials" in name or "Unable to locate credentials" in msg:
        return f"no credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in msg:
        return f"not found: {uri} ({msg})"
    return f"storage error on {uri}: {name}: {msg}"


# A burst of server errors (S3 asks clients to retry 500/503s) can outlast botocore's own few quick
# attempts (moto's listing races a delete elsewhere in the bucket): a wrapped call is tried again
# after each of these pauses while the store answers with server errors. An unreachable endpoint,
# a denied or missing object fail at once.
SERVER_ERROR_PAUSES_S = (1.0, 3.0)
_SERVER_ERROR = re.compile(r"Internal Server Error|Service Unavailable|SlowDown|\((?:500|502|503)\)")
_STORE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs")  # their errors are not OSErrors


def wrap(uri: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its storage errors turned into one-line storage errors, tried
    again while the store answers with server errors (:data:`SERVER_ERROR_PAUSES_S`)."""
    for pause in (*SERVER_ERROR_PAUSES_S, None):
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except Exception as exc:
            ours = isinstance(exc, (OSError, ValueError, RuntimeError))
            if not ours and type(exc).__module__.split(".")[0] not in _STORE_MODULES:
                raise
            if pause is None or not _SERVER_ERROR.search(str(exc)):
                raise StorageError(describe_error(uri, exc)) from exc
        time.sleep(pause)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (rename is atomic there)."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


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
    tmp = posixpath.join(parent, temp_name(posixpath.basename(path)))
    if fs.protocol in ("file", "local") or "file" in fs.protocol:
        _clean_dead_temps_of(parent or ".", posixpath.basename(path))
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)  # a full disk, an interrupt: no half-written temp file stays
            raise
    else:
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: readers see the old object or the new, never half."""
    fs, path = filesystem(uri)
    wrap(uri, _atomic_put, fs, path, data)


def overwrite_in_place(uri: str, data: bytes) -> bool:
    """Rewrite an existing local file in place (truncate, write, fsync): the last resort when an
    atomic write cannot make its temp file (a full disk), since the file's own blocks are freed
    first. Not atomic; False when ``uri`` is not an existing local file or the write failed."""
    fs, path = filesystem(uri)
    if not is_local(fs) or not os.path.isfile(path):
        return False
    try:
        with open(path, "r+b") as fh:
            fh.truncate(0)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------- temp files and leftovers
# Every temp file the storage layer makes (an atomic write's, a shard's spill) is hidden and named
# ``.<target>~<pid>~<host>~<random>.tmp``: no reader or ``*.parquet`` glob sees it, and the next
# pass can tell a dead writer's leftover (this host, process gone) from a live writer's file.
LEFTOVER_AGE_S = 3600.0  # a temp file untouched this long whose writer cannot be asked is dead
_TEMP = re.compile(r"^\.(?P<target>.+?)(?:~(?P<pid>\d+)~(?P<host>[^~]*)~[0-9a-f]+|\.[A-Za-z0-9_]+)\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())


def temp_name(target: str) -> str:
    """The hidden temp-file name for a file that will become ``target`` (a base name)."""
    return f".{target}~{os.getpid()}~{_host()}~{uuid.uuid4().hex[:12]}.tmp"


def temp_target(name: str) -> str | None:
    """The target base name of a temp file's name (new or older naming); None: not a temp file."""
    m = _TEMP.match(name)
    return m.group("target") if m else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        pass
    return True


def temp_is_dead(name: str, mtime: float, now: float | None = None) -> bool:
    """Whether the temp file ``name`` (modified at ``mtime``) is a dead writer's leftover: its
    process is gone from this host, or (another host, older naming) untouched for an hour."""
    m = _TEMP.match(name)
    if m is None:
        return False
    if m.group("pid") and m.group("host") == _host():
        return int(m.group("pid")) != os.getpid() and not _pid_alive(int(m.group("pid")))
    return (now or time.time()) - mtime > LEFTOVER_AGE_S


def temp_entries(folder: str, keep: Callable[[str], bool] | None = None) -> tuple[list[os.DirEntry], int]:
    """The temp files (``.<name>...tmp``) directly in local ``folder`` that ``keep`` keeps, and how
    many entries the folder has: one scan that holds only those (a list of every entry of a
    30,000-entry folder is ~7 MB, and each of a pass's shard threads may be scanning at once)."""
    kept: list[os.DirEntry] = []
    seen = 0
    with os.scandir(folder) as listing:
        for entry in listing:
            seen += 1
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp") and (keep is None or keep(name)):
                kept.append(entry)
    return kept, seen


def _clean_dead_temps_of(folder: str, target: str) -> None:
    """Before ``target`` is written: remove dead writers' temp files of it (a writer killed
    mid-write of the same file: a state record, a marker, a config); in a big folder at most once
    in a while (:func:`scan_due`)."""
    if not scan_due(folder):
        return
    head = f".{target}"
    try:
        entries, seen = temp_entries(folder, lambda name: name.startswith(head))
    except OSError:
        return
    scanned(folder, seen)
    now = time.time()
    for entry in entries:
        try:
            if temp_target(entry.name) == target and temp_is_dead(entry.name, entry.stat().st_mtime, now):
                remove_quietly(entry.path)
        except OSError:
            continue


def clean_temp_files(
    folder: str,
    also: Callable[[str], bool] | None = None,
    only: Callable[[str], bool] | None = None,
    *,
    when_due: bool = True,
) -> list[str]:
    """Remove dead writers' temp files directly in local ``folder`` (see :func:`temp_is_dead`),
    and those whose name ``also(name)`` says this writer owns (a shard's lease holder cleaning its
    shard's spills); ``only(name)`` limits it to some names (a shared folder such as /tmp).
    ``when_due`` (a writer's look before each shard or attempt): skipped in a big folder this
    process scanned a moment ago (:func:`scan_due`); False for a pass's cleaner, which always
    scans. Object stores get no temp files (a PUT is atomic): nothing to do there."""
    fs, path = filesystem(folder)
    if not is_local(fs):
        return []
    if when_due and not scan_due(path):
        return []
    try:
        entries, seen = temp_entries(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise StorageError(describe_error(folder, exc)) from exc
    scanned(path, seen)
    removed = []
    now = time.time()
    for entry in entries:
        if only is not None and not only(entry.name):
            continue
        try:
            dead = temp_is_dead(entry.name, entry.stat().st_mtime, now) or (
                also is not None and also(entry.name)
            )
        except FileNotFoundError:
            continue
        if dead:
            remove_quietly(entry.path)
            removed.append(entry.name)
    return removed


def update_digest(digest: Any, uri: str, chunk: int = 8 * 2**20) -> None:
    """Feed the bytes at ``uri`` to a hashlib ``digest`` in chunks (bounded memory)."""
    fs, path = filesystem(uri)
    with wrap(uri, fs.open, path, "rb") as fh:
        while block := wrap(uri, fh.read, chunk):
            digest.update(block)


def create_exclusive(uri: str, data: bytes) -> bool | None:
    """Write ``data`` only if nothing is at ``uri``: True written, False something was there.

    Exclusive on a local file system (``link()``) and on S3 (a conditional PUT, ``If-None-Match``);
    the object appears complete or not at all.
    None when this store cannot write exclusively (the caller then writes, waits and reads back).
    """
    fs, path = filesystem(uri)
    if is_local(fs):
        folder = os.path.dirname(path) or "."
        wrap(uri, os.makedirs, folder, exist_ok=True)
        # Written whole to a hidden file, then linked into place: link() fails when the name exists,
        # and a reader never sees the file empty (an O_EXCL create is visible before its write).
        tmp = os.path.join(folder, temp_name(os.path.basename(path)))
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise StorageError(describe_error(uri, exc)) from exc
            return _create_excl(path, data)  # a mount without hard links (FUSE buckets, some NFS/SMB)
        finally:
            remove_quietly(tmp)
        return True
    if protocol_of(uri) in ("s3", "s3a"):
        return bool(wrap(uri, _s3_create, fs, path, data))
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


def one_get(fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    """``cat_file`` options for a small object in one GET (else s3fs first asks its size: a HEAD)."""
    return {"max_concurrency": 1} if getattr(fs, "max_concurrency", 1) > 1 else {}


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return wrap(uri, fs.cat_file, path, **one_get(fs))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return bool(wrap(uri, fs.exists, path))


def list_prefixed(uri_prefix: str) -> list[str]:
    """URIs of the files whose path starts with ``uri_prefix`` (on object stores, a prefix listing)."""
    fs, path = filesystem(uri_prefix)
    folder = uri_prefix.rsplit("/", 1)[0] if "/" in uri_prefix else "."
    if is_local(fs):
        # One scan (fsspec's local glob stats every entry: a lease per shard made passes quadratic).
        parent, stem = os.path.split(path)
        try:
            with os.scandir(parent or ".") as entries:
                names = [e.name for e in entries if e.name.startswith(stem) and not e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            names = []
        except OSError as exc:
            raise StorageError(f"cannot list {uri_prefix}*: {exc}") from None
        return sorted(join(folder, n) for n in names)
    found = wrap(uri_prefix, fs.glob, glob_escape(path) + "*")
    return sorted(join(folder, posixpath.basename(p.rstrip("/"))) for p in found)


def glob_escape(path: str) -> str:
    """``path`` with glob magic characters escaped."""
    return re.sub(r"([*?\[\]])", r"[\1]", path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the visible files directly in folder ``uri`` (sorted; hidden names skipped); dead
    writers' temp files found there (see :func:`temp_is_dead`) are removed on the way."""
    fs, path = filesystem(uri)
    if not wrap(uri, fs.exists, path):
        return []
    listed = [posixpath.basename(p.rstrip("/")) for p in wrap(uri, fs.ls, path, detail=False)]
    if is_local(fs) and any(n.startswith(".") and n.endswith(".tmp") for n in listed):
        clean_temp_files(uri)  # a killed writer's temp file (a journal segment's): gone on the next look
    names = sorted(n for n in listed if n.endswith(suffix))
    return [join(uri, n) for n in names if not n.startswith((".", "_"))]


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


class UnreadableFile(StorageError, ValueError):
    """A stored file whose bytes are not what they should be (bad JSON, not Parquet); names it."""


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise UnreadableFile(f"unreadable JSON in {uri}: {exc}") from None


def ensure_writable(uri: str) -> None:
    """Check early that ``uri`` can be written (bucket exists, endpoint reachable, path creatable)."""
    fs, path = filesystem(uri)
    if protocol_of(uri) in ("s3", "s3a"):
        bucket = path.split("/", 1)[0]
        if len(bucket) < 3:
            raise StorageError(f"invalid bucket name in {uri!r}")
        try:
            fs.ls(bucket, refresh=True)  # tells "endpoint unreachable" from "no such bucket"
        except FileNotFoundError:
            raise StorageError(f"bucket {bucket!r} does not exist at the configured S3 endpoint") from None
        except Exception as exc:  # botocore/aiohttp errors are not OSError subclasses
            raise StorageError(describe_error(uri, exc)) from None
        return
    wrap(uri, fs.makedirs, path, exist_ok=True)
