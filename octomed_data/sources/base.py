"""What every source loader shares: the loader context, readers, option parsing, MCQ checks.

A loader is a generator ``load(ctx, path, **options)`` that yields, for every input record,
exactly one ``("question", row)`` or ``("quarantine", row)``. Per-record problems never stop a
run: :meth:`LoaderContext.build` turns a :class:`~octomed_data.schema.RecordError` (or a
record of the wrong shape) into a quarantine row. Whole-file problems (wrong path, not JSON
at all) raise :class:`~octomed_data.errors.SourceError`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from octomed_data.errors import SourceError
from octomed_data.images import ImageStore
from octomed_data.schema import RecordError, TaskType, normalize_text, quarantine_row, question_row

Kind = Literal["question", "quarantine"]
Record = tuple[Kind, dict[str, Any]]

# Reasons raised for records whose structure is wrong (a field missing, a list where a dict
# was expected): quarantined as ``malformed_record`` with the exception text.
_SHAPE_ERRORS = (KeyError, TypeError, AttributeError, ValueError, IndexError)


@dataclass
class LoaderContext:
    """Per-run state a loader needs: names, the image store, where images live, split override."""

    fmt: str
    source: str
    image_store: ImageStore
    images_dir: Path | None = None
    split: str | None = None  # explicit override (--split)

    def quarantine(
        self, input_file: Path | str, index: int, reason: str, detail: str = "", raw: Any = None
    ) -> Record:
        return "quarantine", quarantine_row(
            source=self.source,
            input_file=str(input_file),
            record_index=index,
            reason=reason,
            detail=detail,
            raw=raw,
        )

    def build(
        self,
        input_file: Path | str,
        index: int,
        raw: Any,
        make: Callable[..., dict[str, Any]],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Record:
        """Run ``make(*args, **kwargs)`` for one record; any per-record failure is quarantined."""
        try:
            return "question", make(*args, **kwargs)
        except RecordError as exc:
            return self.quarantine(input_file, index, exc.reason, exc.detail, raw)
        except _SHAPE_ERRORS as exc:
            return self.quarantine(input_file, index, "malformed_record", f"{type(exc).__name__}: {exc}", raw)

    def split_for(self, input_file: Path, default: str = "unknown") -> str:
        """The split: ``--split`` if given, else from the file name (train/dev/val/test), else ``default``."""
        return self.split or infer_split(input_file) or default

    def resolve_image(self, ref: str, input_file: Path) -> Path:
        """Where an image reference points: against ``--images``, else the input file's folder."""
        if not isinstance(ref, str) or not ref.strip():
            raise RecordError("missing_image", "empty image reference")
        p = Path(ref.strip())
        if p.is_absolute():
            return p
        base = self.images_dir if self.images_dir is not None else input_file.parent
        return base / p

    def image(self, ref: str, input_file: Path) -> tuple[dict[str, Any], str | None]:
        """Decode + store one referenced image; ``RecordError`` (missing/corrupt) if unusable."""
        path = self.resolve_image(ref, input_file)
        if not path.exists():
            hint = "" if self.images_dir is not None else " (no --images folder given)"
            raise RecordError("missing_image", f"image not found: {ref}{hint}")
        return self.image_store.put(path)

    def images(self, refs: Iterable[str], input_file: Path) -> tuple[list[dict[str, Any]], str | None]:
        """Several images of one record; the first DICOM modality found is returned."""
        out: list[dict[str, Any]] = []
        modality = None
        for ref in refs:
            image, mod = self.image(ref, input_file)
            out.append(image)
            modality = modality or mod
        if not out:
            raise RecordError("missing_image", "record lists no image")
        return out, modality


_SPLIT_TOKENS = {
    "train": "train",
    "training": "train",
    "dev": "dev",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
}


def infer_split(path: Path | str) -> str | None:
    """``train`` / ``dev`` / ``validation`` / ``test`` when the file name says so, else None."""
    name = Path(path).name.lower()
    for token in re.split(r"[^a-z0-9]+", name):
        if token in _SPLIT_TOKENS:
            return _SPLIT_TOKENS[token]
    if re.search(r"_input(\.|$)", name):
        return "test"  # the MedXpertQA-eval harness' <benchmark>_input.jsonl files are test inputs
    return None


def input_files(path: Path, patterns: Iterable[str]) -> list[Path]:
    """``path`` itself, or the files in folder ``path`` matching ``patterns`` (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted({p for pat in patterns for p in path.glob(pat) if p.is_file()})
        if not found:
            raise SourceError(f"no input files matching {', '.join(patterns)} in {path}")
        return found
    raise SourceError(f"input path does not exist: {path}")


# ------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MalformedLine:
    """A JSON Lines line that does not parse; quarantined as ``malformed_json``."""

    text: str
    error: str


def _open_input(path: Path):
    """Open an input file for reading; an unreadable file is one clear error, not a traceback."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None


def sniff_json(path: Path) -> Literal["json", "jsonl"]:
    """JSON Lines (one object per line, even if named .json) or one JSON document.

    A first line that is a complete JSON value means JSON Lines when more lines follow (a bad
    first record, quarantined later), one document when it is the only line (a minified array).
    """
    with _open_input(path) as fh:
        lines = (raw.strip() for raw in fh)
        first = next((line for line in lines if line), None)
        if first is None:
            return "jsonl"
        try:
            obj = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            # "[" or "{" alone opens a pretty-printed document; anything else is a bad first line.
            return "json" if first in (b"{", b"[") or first.startswith(b"[") else "jsonl"
        if isinstance(obj, dict):
            return "jsonl"
        return "jsonl" if next((line for line in lines if line), None) is not None else "json"


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | MalformedLine]]:
    """(line index, object) per non-blank line; bad lines come back as :class:`MalformedLine`."""
    with _open_input(path) as fh:
        for index, raw in enumerate(fh):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield index, MalformedLine(raw.decode("utf-8", "replace")[:4096], f"not UTF-8: {exc.reason}")
                continue
            except json.JSONDecodeError as exc:
                yield index, MalformedLine(raw.decode("utf-8", "replace")[:4096], f"invalid JSON: {exc.msg}")
                continue
            if not isinstance(obj, dict):
                yield index, MalformedLine(raw.decode("utf-8", "replace")[:4096], "line is not a JSON object")
                continue
            yield index, obj


def load_json(path: Path) -> Any:
    """A whole JSON document (the upstream array/object files are a few MB at most)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path} is not UTF-8 text: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None


def iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Records of a JSON Lines file or of a JSON array, with their index."""
    if sniff_json(path) == "jsonl":
        yield from iter_jsonl(path)
        return
    doc = load_json(path)
    if not isinstance(doc, list):
        raise SourceError(f"{path}: expected a JSON array of records, found a JSON {type(doc).__name__}")
    yield from enumerate(doc)


def iter_csv(path: Path, header: bool) -> Iterator[tuple[int, list[str] | dict[str, str] | MalformedLine]]:
    """CSV rows with their 0-based data-row index (header excluded), streamed from disk.

    Blank lines are not records; a row whose cells are all empty is one (quarantined as a
    :class:`MalformedLine`). Text that is not UTF-8 makes the whole file unreadable.
    """
    try:
        fh = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        reader = csv.reader(fh)

        def next_row() -> list[str]:
            try:
                return next(reader)
            except UnicodeDecodeError as exc:
                raise SourceError(f"{path} is not UTF-8 text: {exc.reason}") from None

        try:
            columns = next_row() if header else None
        except StopIteration:
            return
        except csv.Error as exc:
            raise SourceError(f"{path}: unreadable CSV header: {exc}") from None
        index = 0
        while True:
            try:
                row = next_row()
            except StopIteration:
                return
            except csv.Error as exc:
                yield index, MalformedLine("", f"CSV error: {exc}")
                index += 1
                continue
            if not row:
                continue  # a blank line
            if not any(cell.strip() for cell in row):
                yield index, MalformedLine(json.dumps(row), "empty row")
            elif columns is not None and len(row) != len(columns):
                yield index, MalformedLine(json.dumps(row), f"{len(row)} fields, header has {len(columns)}")
            elif columns is not None:
                yield index, dict(zip(columns, row, strict=True))
            else:
                yield index, row
            index += 1


# ------------------------------------------------------------------------------------------
# Multiple-choice helpers
# ------------------------------------------------------------------------------------------

_ANSWER_CHOICES = re.compile(r"\s*Answer Choices:\s*", re.IGNORECASE)


_LETTERS = [chr(ord("A") + i) for i in range(26)]
_PAREN_MARKERS = {L: re.compile(rf"(?:^|(?<=\s))\({L}\)\s*") for L in _LETTERS}
_SUFFIX_MARKERS = {L: re.compile(rf"(?:^|(?<=[\s,;]))(?<![A-Za-z]){L}\)\s*") for L in _LETTERS}


def parse_lettered_options(text: str, style: Literal["paren", "suffix"]) -> tuple[str, list[tuple[str, str]]]:
    """Split ``"stem (A) x (B) y"`` (style ``paren``) or ``"stem A) x, B) y"`` (``suffix``).

    Labels must run A, B, C ... in order; each is searched after the previous one, so option
    text mentioning any letter other than the next one (e.g. "unlike (D)" inside option B)
    does not split early. Returns (stem, options);
    options is empty when no ``A`` marker is found.
    """

    markers = _PAREN_MARKERS if style == "paren" else _SUFFIX_MARKERS
    found: list[tuple[str, int, int]] = []
    pos = 0
    for i in range(26):
        label = chr(ord("A") + i)
        m = markers[label].search(text, pos)
        if m is None:
            break
        found.append((label, m.start(), m.end()))
        pos = m.end()
    if len(found) < 2:
        return text.strip(), []
    options = []
    for j, (label, _, end) in enumerate(found):
        stop = found[j + 1][1] if j + 1 < len(found) else len(text)
        value = text[end:stop].strip()
        if style == "suffix":
            value = value.rstrip(",;").strip()
        options.append((label, value))
    return text[: found[0][1]].strip(), options


def split_answer_choices(question: str, parse: bool = True) -> tuple[str, list[tuple[str, str]]]:
    """Strip a trailing ``"Answer Choices: (A) ... (B) ..."`` block (MedXpertQA-eval style).

    Returns (stem, options); with ``parse=False`` (the record has its own options) only the
    stem is computed, which is most of the cost saved on 10-option questions.
    """
    at, end = question.rfind("Answer Choices:"), -1
    if at >= 0:
        end = at + len("Answer Choices:")
    else:  # rare spellings ("answer choices:") take the slower case-insensitive search
        matches = list(_ANSWER_CHOICES.finditer(question))
        if not matches:
            return question.strip(), []
        at, end = matches[-1].start(), matches[-1].end()
    options = parse_lettered_options(question[end:], "paren")[1] if parse else []
    return question[:at].strip(), options


_LABEL = re.compile(r"^\(?\s*([A-Za-z])\s*[\).:]?$")


def answer_label(value: Any) -> str:
    """Normalise a gold option label: ``"B"``, ``"(b)"``, ``["B"]``, ``"B."`` -> ``"B"``."""
    if isinstance(value, list):
        if len(value) != 1:
            raise RecordError("invalid_answer", f"expected one answer label, got {value!r}")
        value = value[0]
    if value is None or not str(value).strip():
        raise RecordError("missing_answer", "no gold answer label")
    m = _LABEL.match(str(value).strip())
    if not m:
        raise RecordError("invalid_answer", f"{str(value)[:80]!r} is not an option label")
    return m.group(1).upper()


def _same_text(a: str, b: str) -> bool:
    return normalize_text(a).casefold().rstrip(".") == normalize_text(b).casefold().rstrip(".")


def mcq_row(
    ctx: LoaderContext,
    *,
    input_file: Path,
    index: int,
    split: str,
    question: str,
    options: list[tuple[str, str]],
    answer: Any,
    answer_text: str | None = None,
    task_type: TaskType = TaskType.TEXT_MCQ,
    images: list[dict[str, Any]] | None = None,
    modality: str | None = None,
    anatomy: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A validated multiple-choice row; the source's answer text, when given, must agree."""
    label = answer_label(answer)
    opts = dict(options)
    if label in opts and answer_text is not None and str(answer_text).strip():
        if not _same_text(str(answer_text), opts[label]):
            raise RecordError(
                "answer_mismatch",
                f"answer {label} is {opts[label][:80]!r} but the record says {str(answer_text)[:80]!r}",
            )
    return question_row(
        source=ctx.source,
        split=split,
        task_type=task_type,
        question=question,
        options=options,
        answer=label,
        input_file=str(input_file),
        record_index=index,
        images=images or (),
        modality=modality,
        anatomy=anatomy,
        metadata=_clean_metadata(metadata),
    )


def short_answer_task(answer: str, default: TaskType) -> TaskType:
    """``yes_no_maybe`` for yes/no(/maybe) answers, else ``default`` (open_vqa / open_qa)."""
    return TaskType.YES_NO_MAYBE if normalize_text(str(answer)).lower() in ("yes", "no", "maybe") else default


def _clean_metadata(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    if not metadata:
        return None
    out = {k: v for k, v in metadata.items() if v is not None and v != "" and v != "NULL"}
    return out or None


def clean_metadata(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """Drop empty / ``"NULL"`` values so metadata carries only what the source says."""
    return _clean_metadata(metadata)


def text_of(value: Any, field: str) -> str:
    """A required text field; a missing or non-text value is a malformed record."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        if value is None:
            raise RecordError(
                "missing_question" if field == "question" else "malformed_record", f"{field} missing"
            )
        raise RecordError("malformed_record", f"{field} is a {type(value).__name__}, expected text")
    return str(value)
