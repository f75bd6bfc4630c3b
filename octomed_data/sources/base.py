"""What every source loader shares: the loader context, readers, option parsing, MCQ checks.

A loader is a generator ``load(ctx, path, **options)`` that yields, for every input record,
exactly one ``("question", row)`` or ``("quarantine", row)``. Per-record problems never stop a
run: :meth:`LoaderContext.build` turns a :class:`~octomed_data.schema.RecordError` (or a
record of the wrong shape) into a quarantine row. Whole-file problems (wrong path, not JSON
at all) raise :class:`~octomed_data.errors.SourceError`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from octomed_data.errors import SourceError
from octomed_data.images import ImageStore
from octomed_data.schema import RecordError, TaskType, normalize_text, quarantine_row, question_row
from octomed_data.sources.paths import SourcePath
from octomed_data.sources.readers import (  # noqa: F401  (the loaders' readers, re-exported)
    MalformedLine,
    iter_csv,
    iter_json_members,
    iter_json_records,
    iter_jsonl,
    load_json,
    scrub,
    sniff_json,
)

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
    images_dir: SourcePath | None = None
    split: str | None = None  # explicit override (--split)

    def quarantine(
        self, input_file: SourcePath | str, index: int, reason: str, detail: str = "", raw: Any = None
    ) -> Record:
        if raw is not None and not isinstance(raw, str):
            try:
                raw = json.dumps(raw, ensure_ascii=False, default=str)
            except (TypeError, ValueError):
                raw = repr(raw)
        return "quarantine", quarantine_row(
            source=self.source,
            input_file=str(input_file),
            record_index=index,
            reason=reason,
            detail=scrub(detail) if detail else detail,
            raw=scrub(raw) if raw else raw,  # Parquet text must be UTF-8: undecodable bytes shown as U+FFFD
        )

    def build(
        self,
        input_file: SourcePath | str,
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

    def split_for(self, input_file: SourcePath, default: str = "unknown") -> str:
        """The split: ``--split`` if given, else from the file name (train/dev/val/test), else ``default``."""
        return self.split or infer_split(input_file.name) or default

    def resolve_image(self, ref: str, input_file: SourcePath) -> SourcePath:
        """Where an image reference points: a URI or absolute path as is, else against
        ``--images``, else against the input file's folder (same filesystem as the input)."""
        if not isinstance(ref, str) or not ref.strip():
            raise RecordError("missing_image", "empty image reference")
        ref = ref.strip()
        if "://" in ref or os.path.isabs(ref):
            return SourcePath.of(ref)
        base = self.images_dir if self.images_dir is not None else input_file.parent
        return base / ref

    def image(self, ref: str, input_file: SourcePath) -> tuple[dict[str, Any], str | None]:
        """Decode + store one referenced image; ``RecordError`` (missing/corrupt) if unusable."""
        return self.image_at(self.resolve_image(ref, input_file), ref)

    def image_at(self, location: SourcePath, ref: str) -> tuple[dict[str, Any], str | None]:
        """Decode + store the image at ``location`` (``ref``: how the record named it)."""
        if not location.exists():
            hint = "" if self.images_dir is not None else " (no --images folder given)"
            raise RecordError("missing_image", f"image not found: {ref}{hint}")
        return self.image_store.put(location.uri)

    def images(self, refs: Iterable[str], input_file: SourcePath) -> tuple[list[dict[str, Any]], str | None]:
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


def infer_split(path: SourcePath | str) -> str | None:
    """``train`` / ``dev`` / ``validation`` / ``test`` when the file name says so, else None."""
    name = (
        path.name if isinstance(path, SourcePath) else str(path).replace("\\", "/").rsplit("/", 1)[-1]
    ).lower()
    for token in re.split(r"[^a-z0-9]+", name):
        if token in _SPLIT_TOKENS:
            return _SPLIT_TOKENS[token]
    if re.search(r"_input(\.|$)", name):
        return "test"  # the MedXpertQA-eval harness' <benchmark>_input.jsonl files are test inputs
    return None


def input_files(path: SourcePath, patterns: Iterable[str]) -> list[SourcePath]:
    """``path`` itself, or the files in folder ``path`` matching ``patterns`` (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted({p for pat in patterns for p in path.glob_files(pat)})
        if not found:
            raise SourceError(f"no input files matching {', '.join(patterns)} in {path}")
        return found
    raise SourceError(f"input path does not exist: {path}")


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
    input_file: SourcePath,
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
