"""Input locations for the loaders: a file or folder on any fsspec filesystem.

:class:`SourcePath` offers the few :class:`pathlib.Path` operations the loaders use (``name``,
``suffix``, ``parent``, ``/``, ``exists``, ``is_file``, ``glob`` ...) over the one storage layer
(:func:`octomed_data.storage.filesystem`), so a local path, ``file://`` and ``s3://bucket/x.jsonl``
are read alike. A local path is made absolute when the location is created
(:func:`~octomed_data.storage.absolute_uri`): every ``input_file`` written to a row, and every
image resolved against an input, is independent of the working directory.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec

from octomed_data import storage
from octomed_data.errors import OctomedError, SourceError

T = TypeVar("T")


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
    def suffix(self) -> str:
        name = self.name
        dot = name.rfind(".")
        return name[dot:] if 0 < dot < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        return self.name[: len(self.name) - len(self.suffix)] if self.suffix else self.name

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

    def open(self) -> IO[bytes]:
        """Open for binary reading; an unreadable file is one clear :class:`SourceError`."""
        try:
            return self.fs.open(self.path, "rb")
        except OSError as exc:
            raise SourceError(f"cannot read {self.uri}: {exc.strerror or exc}") from None
        except Exception as exc:
            raise SourceError(storage.describe_error(self.uri, exc)) from None

    def read_bytes(self) -> bytes:
        with self.open() as fh:
            return fh.read()
