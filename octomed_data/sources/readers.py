"""The shared readers of the loaders: JSON Lines, streamed JSON documents, CSV, from any URI.

Every reader opens its input through :class:`~octomed_data.sources.paths.SourcePath` (local,
``file://``, ``s3://`` ...) and streams: memory is bounded by one record (one line, one array
element, one member of the object being walked), never by the file.

Bytes that are not UTF-8 never fail a whole file: text is decoded with ``surrogateescape`` and a
record holding such bytes comes back as a :class:`MalformedLine` (quarantined by the loader with
a reason), so one bad byte costs one record, in every format. Structural damage of a JSON
document (``[{`` cut short) is a whole-file :class:`~octomed_data.errors.SourceError`: after it
no record boundary can be trusted.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

from octomed_data.errors import SourceError
from octomed_data.sources.paths import SourcePath

# Undecodable bytes become lone surrogates (U+DC80..U+DCFF) under ``surrogateescape``.
_SURROGATE = re.compile("[\ud800-\udfff]")
_CHUNK = 1 << 18  # bytes read at a time (256 KiB): memory is a few chunks plus one record
_MAX_RECORD = 512 << 20  # a single record larger than this is a broken document


@dataclass(frozen=True)
class MalformedLine:
    """A record that cannot be read (bad JSON line, bad bytes, bad CSV row); quarantined."""

    text: str
    error: str


def has_bad_text(value: Any) -> bool:
    """True when any string in ``value`` (keys included) holds bytes that were not UTF-8."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(has_bad_text(k) or has_bad_text(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_bad_text(v) for v in value)
    return False


def scrub(text: str) -> str:
    """``text`` with undecodable bytes shown as U+FFFD: safe to store (Parquet needs valid UTF-8)."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def bad_record(value: Any) -> MalformedLine:
    """The quarantine form of a record that holds non-UTF-8 bytes."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return MalformedLine(scrub(text)[:4096], "not UTF-8 text (undecodable bytes in this record)")


# ------------------------------------------------------------------------------------------
# JSON Lines
# ------------------------------------------------------------------------------------------


def sniff_json(path: SourcePath) -> Literal["json", "jsonl"]:
    """JSON Lines (one object per line, even if named .json) or one JSON document.

    A first line that is a complete JSON value means JSON Lines when more lines follow (a bad
    first record, quarantined later), one document when it is the only line (a minified array).
    Only the first 256 KiB are read: a minified array of any size is one long line.
    """
    with path.open() as fh:
        head = fh.read(_CHUNK)
    full = len(head) < _CHUNK
    lines = head.splitlines()
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    if not nonblank:
        return "jsonl"
    first = lines[nonblank[0]].strip().removeprefix(b"\xef\xbb\xbf")
    truncated = nonblank[0] == len(lines) - 1 and not full and not head.endswith((b"\n", b"\r"))
    if truncated:
        # The first line runs past the first chunk: a minified document or one huge record.
        return "json" if first.startswith(b"[") else "jsonl"
    try:
        obj = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        # "[" or "{" alone opens a pretty-printed document; anything else is a bad first line.
        return "json" if first in (b"{", b"[") or first.startswith(b"[") else "jsonl"
    if isinstance(obj, dict):
        return "jsonl"
    more = len(nonblank) > 1 or not full
    return "jsonl" if more else "json"


def iter_jsonl(path: SourcePath) -> Iterator[tuple[int, dict[str, Any] | MalformedLine]]:
    """(line index, object) per non-blank line; bad lines come back as :class:`MalformedLine`."""
    with path.open() as fh:
        for index, raw in enumerate(fh):
            if not raw.strip():
                continue
            text = raw.decode("utf-8", "replace")[:4096]
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield index, MalformedLine(text, f"not UTF-8: {exc.reason}")
                continue
            except json.JSONDecodeError as exc:
                yield index, MalformedLine(text, f"invalid JSON: {exc.msg}")
                continue
            if not isinstance(obj, dict):
                yield index, MalformedLine(text, "line is not a JSON object")
                continue
            yield index, obj


# ------------------------------------------------------------------------------------------
# Streamed JSON documents
# ------------------------------------------------------------------------------------------


class JsonStream:
    """Walk one JSON document member by member with ``json.JSONDecoder.raw_decode`` over chunks.

    Only the member being decoded (plus one chunk) is held in memory. Text is decoded with
    ``surrogateescape``: non-UTF-8 bytes survive as lone surrogates for :func:`has_bad_text`.
    """

    def __init__(self, fh: IO[bytes], where: str, chunk_size: int = _CHUNK) -> None:
        self.fh = fh
        self.where = where
        self.chunk_size = chunk_size
        self.text = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.decoder = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.lines_before = 0  # newlines in text already dropped from the buffer (for messages)
        self.started = False

    def _fill(self, size: int | None = None) -> bool:
        """Append the next chunk (dropping what was consumed); False at the end of the file."""
        if self.eof:
            return False
        if self.pos:
            self.lines_before += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos :], 0
        data = self.fh.read(size or self.chunk_size)
        if not data:
            self.eof = True
            self.buf += self.text.decode(b"", final=True)
            return False
        chunk = self.text.decode(data)
        if not self.started:
            chunk, self.started = chunk.removeprefix("\ufeff"), True
        self.buf += chunk
        return True

    def _peek(self) -> str | None:
        """The next non-whitespace character (not consumed), or None at the end."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return None

    def _error(self, what: str, at: int | None = None) -> SourceError:
        line = self.lines_before + self.buf.count("\n", 0, self.pos if at is None else at) + 1
        return SourceError(f"{self.where} is not valid JSON: {what} at line {line}")

    def value(self) -> Any:
        """Decode the value at the cursor (reading more of the file until it is complete)."""
        if self._peek() is None:
            raise self._error("unexpected end of file")
        size = self.chunk_size
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                # Incomplete or invalid: only the end of the file (or an absurd size) tells which.
                if self.eof or len(self.buf) - self.pos > _MAX_RECORD:
                    raise self._error(exc.msg, exc.pos) from None
                self._fill(size)
                size = min(size * 2, 64 * self.chunk_size)  # one big member: fewer re-parses
                continue
            if end == len(self.buf) and not self.eof and self._fill(size):
                continue  # a number may go on in the next chunk ("12" | "34"): decode again
            self.pos = end
            return obj

    def kind(self) -> Literal["array", "object", "other"]:
        """What the value at the cursor is (the document's top level, before reading it)."""
        c = self._peek()
        return "array" if c == "[" else "object" if c == "{" else "other"

    def members(self) -> Iterator[str | int]:
        """Keys (object) or indexes (array) of the container at the cursor.

        After each key the caller consumes its value: :meth:`value`, or :meth:`members` again
        to walk into it.
        """
        c = self._peek()
        if c not in ("[", "{"):
            raise self._error("expected an array or object")
        close = "]" if c == "[" else "}"
        self.pos += 1
        if self._peek() == close:
            self.pos += 1
            return
        index = 0
        while True:
            if close == "}":
                key = self.value()
                if not isinstance(key, str):
                    raise self._error("expected a member name")
                if self._peek() != ":":
                    raise self._error("expected ':'")
                self.pos += 1
                yield key
            else:
                yield index
            index += 1
            c = self._peek()
            if c == ",":
                self.pos += 1
                continue
            if c == close:
                self.pos += 1
                return
            raise self._error(f"expected ',' or '{close}'" if c else "unexpected end of file")

    def walk(self, path: Sequence[str] = ()) -> Iterator[tuple[str | int, Any]]:
        """(key, value) of the container at ``path`` below the cursor, one member at a time.

        Members off the path are decoded and dropped one by one; a missing path yields nothing.
        """
        for key in self.members():
            if not path:
                yield key, self.value()
            elif key == path[0] and self.kind() in ("array", "object"):
                yield from self.walk(path[1:])
            else:
                self.value()

    def finish(self) -> None:
        """Fail on anything but whitespace after the document."""
        if self._peek() is not None:
            raise self._error("extra data after the document")


def iter_json_members(path: SourcePath, walk: Sequence[str] = ()) -> Iterator[tuple[str | int, Any]]:
    """(key, value) of a JSON document's top-level container (or the one at ``walk``), streamed."""
    with path.open() as fh:
        stream = JsonStream(fh, path.uri)
        if stream.kind() == "other":
            raise stream._error("expected a JSON array or object")
        yield from stream.walk(walk)
        stream.finish()


def json_kind(path: SourcePath) -> Literal["array", "object", "other"]:
    """Whether a JSON document is an array or an object (reads only its start)."""
    with path.open() as fh:
        return JsonStream(fh, path.uri).kind()


def load_json(path: SourcePath) -> Any:
    """A whole (small) JSON document, e.g. PubMedQA's list of test ids."""
    try:
        with path.open() as fh:
            return json.loads(fh.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path} is not UTF-8 text: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def iter_json_records(path: SourcePath) -> Iterator[tuple[int, Any]]:
    """Records of a JSON Lines file or of a JSON array, with their index, streamed.

    A record holding non-UTF-8 bytes comes back as a :class:`MalformedLine`.
    """
    if sniff_json(path) == "jsonl":
        yield from iter_jsonl(path)
        return
    kind = json_kind(path)
    if kind != "array":
        found = "JSON object" if kind == "object" else "JSON value"
        raise SourceError(f"{path}: expected a JSON array of records, found a {found}")
    for index, rec in iter_json_members(path):
        yield int(index), bad_record(rec) if has_bad_text(rec) else rec


# ------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------


def iter_csv(
    path: SourcePath, header: bool
) -> Iterator[tuple[int, list[str] | dict[str, str] | MalformedLine]]:
    """CSV rows with their 0-based data-row index (header excluded), streamed.

    Blank lines are not records; a row whose cells are all empty is one (quarantined as a
    :class:`MalformedLine`), and so is a row holding bytes that are not UTF-8.
    """
    with path.open() as raw:
        fh = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(fh)
        try:
            columns = [scrub(c) for c in next(reader)] if header else None
        except StopIteration:
            return
        except csv.Error as exc:
            raise SourceError(f"{path}: unreadable CSV header: {exc}") from None
        index = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield index, MalformedLine("", f"CSV error: {exc}")
                index += 1
                continue
            if not row:
                continue  # a blank line
            if has_bad_text(row):
                yield index, bad_record(row)
            elif not any(cell.strip() for cell in row):
                yield index, MalformedLine(json.dumps(row), "empty row")
            elif columns is not None and len(row) != len(columns):
                yield index, MalformedLine(json.dumps(row), f"{len(row)} fields, header has {len(columns)}")
            elif columns is not None:
                yield index, dict(zip(columns, row, strict=True))
            else:
                yield index, row
            index += 1
