"""Input locations for the loaders: a file or folder on any fsspec filesystem.

:class:`SourcePath` offers the few :class:`pathlib.Path` operations the loaders use (``name``,
``suffix``, ``parent``, ``/``, ``exists``, ``is_file``, ``glob`` ...) over the one storage layer
(:func:`octomed_data.storage.filesystem`), so a local path, ``file://`` and ``s3://bucket/x.jsonl``
are read alike. A local path is made absolute when the location is created
(:func:`~octomed_data.storage.absolute_uri`): every ``input_file`` written to a row, and every
image resolved against an input, is independent of the working directory.

A gzipped file (``x.jsonl.gz``, ``x.csv.gz``) is read decompressed, as the file it holds (its
``suffix`` and ``stem`` are those of that file), up to :data:`MAX_DECOMPRESSED` bytes. Archives
(``.zip``, ``.tar.gz``, ``.tgz``, ``.bz2``, ``.xz`` ...) are refused with one line naming the file
(``compressed_archive_unsupported``): their members would be paths to trust, and nothing here needs them.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import zlib
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec

from octomed_data import storage
from octomed_data.errors import OctomedError, SourceError

T = TypeVar("T")

# Archive and compression suffixes that are not read (longest first: ``.tar.gz`` before ``.gz``).
ARCHIVE_SUFFIXES = (".tar.bz2", ".tar.gz", ".tar.xz", ".tar.zst", ".tbz2", ".tgz", ".txz", ".zip", ".tar")
ARCHIVE_SUFFIXES += (".bz2", ".xz", ".zst", ".7z", ".rar", ".lz4", ".lzma")
MAX_DECOMPRESSED = 16 << 30  # bytes a gzipped input may expand to (a gzip bomb stops here)


class SourcePath:
    """A file or folder at a URI; immutable, hashable, ordered by URI."""

    __slots__ = ("fs", "path", "uri")

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/") or "/"
        self.uri = storage.to_uri(fs, self.path)

    @classmethod
    def of(cls, location: str | os.PathLike[str] | SourcePath) -> SourcePath:
        """The location of a path or URI (a local path is made absolute)."""
        if isinstance(location, SourcePath):
            return location
        uri = storage.absolute_uri(os.fspath(location))
        fs, path = storage.filesystem(uri)
        return cls(fs, path)

    # ------------------------------------------------------------------ pure path operations
    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"SourcePath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SourcePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: SourcePath) -> bool:
        return self.uri < other.uri

    @property
    def is_local(self) -> bool:
        return storage.protocol_of(self.uri) == "file"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def archive(self) -> str | None:
        """The archive or compression suffix this name ends with that is not read (``.zip``), or None."""
        low = self.name.lower()
        return next((s for s in ARCHIVE_SUFFIXES if low.endswith(s) and len(low) > len(s)), None)

    @property
    def gzipped(self) -> bool:
        """A gzipped single file (``x.jsonl.gz``), read decompressed."""
        low = self.name.lower()
        return low.endswith(".gz") and len(low) > 3 and self.archive is None

    @property
    def _data_name(self) -> str:
        return self.name[:-3] if self.gzipped else self.name

    @property
    def suffix(self) -> str:
        """The suffix of the data file (``x.jsonl.gz`` -> ``.jsonl``)."""
        name = self._data_name
        dot = name.rfind(".")
        return name[dot:] if 0 < dot < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        name = self._data_name
        return name[: len(name) - len(self.suffix)] if self.suffix else name

    @property
    def parent(self) -> SourcePath:
        return SourcePath(self.fs, posixpath.dirname(self.path) or "/")

    def __truediv__(self, part: str) -> SourcePath:
        return SourcePath(self.fs, posixpath.normpath(posixpath.join(self.path, str(part))))

    def relative_to(self, other: SourcePath) -> str:
        """This location's path below ``other`` (``/``-separated)."""
        return posixpath.relpath(self.path, other.path)

    # ------------------------------------------------------------------ filesystem operations
    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one filesystem call; storage failures become one clear :class:`SourceError`."""
        try:
            return fn(*args, **kwargs)
        except OctomedError:
            raise
        except Exception as exc:  # botocore/aiohttp errors are not OSError subclasses
            raise SourceError(storage.describe_error(self.uri, exc)) from None

    def exists(self) -> bool:
        return bool(self._call(self.fs.exists, self.path))

    def is_file(self) -> bool:
        return bool(self._call(self.fs.isfile, self.path))

    def is_dir(self) -> bool:
        return bool(self._call(self.fs.isdir, self.path))

    def glob_files(self, pattern: str) -> list[SourcePath]:
        """Files (not folders) in this folder matching ``pattern`` (``*.jsonl``), sorted."""
        found = self._call(self.fs.glob, posixpath.join(self.path, pattern), detail=True)
        return sorted(SourcePath(self.fs, p) for p, info in found.items() if info.get("type") == "file")

    def iterdir(self) -> list[SourcePath]:
        """Entries directly in this folder, hidden names (``.x``) included, sorted."""
        entries = self._call(self.fs.ls, self.path, detail=False)
        return sorted(SourcePath(self.fs, p) for p in entries if p.rstrip("/") != self.path)

    def files_below(self) -> list[SourcePath]:
        """Every file anywhere below this folder, sorted."""
        return sorted(SourcePath(self.fs, p) for p in self._call(self.fs.find, self.path))

    def check_readable_kind(self) -> None:
        """Refuse an archive (``compressed_archive_unsupported``) in one line naming the file."""
        if self.archive:
            raise SourceError(
                f"{self.uri}: a {self.archive} archive is not read (compressed_archive_unsupported); "
                "unpack it and give the extracted file or folder"
            )

    def open(self) -> IO[bytes]:
        """Open for binary reading (a gzipped file decompressed); an unreadable file, an archive or a
        broken gzip stream is one clear :class:`SourceError` naming the file."""
        self.check_readable_kind()
        try:
            fh = self.fs.open(self.path, "rb")
        except OSError as exc:
            raise SourceError(f"cannot read {self.uri}: {exc.strerror or exc}") from None
        except Exception as exc:
            raise SourceError(storage.describe_error(self.uri, exc)) from None
        if self.gzipped:
            return io.BufferedReader(_Gunzip(fh, self.uri, MAX_DECOMPRESSED), 1 << 18)
        return fh

    def read_bytes(self) -> bytes:
        with self.open() as fh:
            return fh.read()


class _Gunzip(io.RawIOBase):
    """A gzipped file read decompressed, at most ``limit`` bytes; damage is a :class:`SourceError`."""

    def __init__(self, fh: IO[bytes], uri: str, limit: int) -> None:
        super().__init__()
        self.fh, self.uri, self.limit, self.total = fh, uri, limit, 0
        self.gz = gzip.GzipFile(fileobj=fh, mode="rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            n = self.gz.readinto(buffer)
        except (OSError, EOFError, zlib.error) as exc:
            raise SourceError(f"{self.uri}: not a readable gzip file ({exc})") from None
        self.total += n
        if self.total > self.limit:
            raise SourceError(f"{self.uri}: decompresses to more than {self.limit} bytes; refused")
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self.gz.close()
                self.fh.close()
            finally:
                super().close()
