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
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from octomed_data import storage
from octomed_data.errors import SourceError
from octomed_data.images import ImageStore
from octomed_data.schema import (
    RecordError,
    TaskType,
    normalize_text,
    quarantine_row,
    question_row,
    strip_controls,
)
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

# Image references with these schemes point at a server: refused (``remote_image_refused``), never fetched.
REMOTE_SCHEMES = frozenset({"http", "https", "ftp", "ftps"})
_SAME_PROTOCOL = {"s3a": "s3", "local": "file"}


@dataclass
class LoaderContext:
    """Per-run state a loader needs: names, the image store, where images live, split override.

    ``counts`` tallies what was cleaned on the way: ``control_chars_removed`` (characters stripped
    from question texts, :func:`~octomed_data.schema.strip_controls`) and ``records_with_control_chars``.
    """

    fmt: str
    source: str
    image_store: ImageStore
    images_dir: SourcePath | None = None
    split: str | None = None  # explicit override (--split)
    counts: Counter[str] = field(default_factory=Counter)

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
            row = make(*args, **kwargs)
        except RecordError as exc:
            return self.quarantine(input_file, index, exc.reason, exc.detail, raw)
        except _SHAPE_ERRORS as exc:
            return self.quarantine(input_file, index, "malformed_record", f"{type(exc).__name__}: {exc}", raw)
        meta = row.get("metadata")
        if meta and '"control_chars_removed"' in meta:
            self.counts["control_chars_removed"] += int(json.loads(meta).get("control_chars_removed") or 0)
            self.counts["records_with_control_chars"] += 1
        return "question", row

    def split_for(self, input_file: SourcePath, default: str = "unknown") -> str:
        """The split: ``--split`` if given, else from the file name (train/dev/val/test), else ``default``."""
        return self.split or infer_split(input_file.name) or default

    def image_root(self, input_file: SourcePath) -> SourcePath:
        """The folder every image of ``input_file`` must lie in: ``--images``, else the file's folder."""
        return self.images_dir if self.images_dir is not None else input_file.parent

    def resolve_image(self, ref: str, input_file: SourcePath) -> SourcePath:
        """Where an image reference points, confined to :meth:`image_root`.

        A relative reference resolves against the root; an absolute path or a URI is accepted only
        when it names a file below the root, on the root's own filesystem (same bucket). Anything
        else is a :class:`RecordError` before the file is touched: ``image_outside_root`` (``../``
        escapes, absolute paths elsewhere, other buckets or filesystems) or ``remote_image_refused``
        (``http(s)://``: images are never fetched). The check is on the normalised path; links
        inside the root are the root owner's to make.
        """
        if not isinstance(ref, str) or not ref.strip():
            raise RecordError("missing_image", "empty image reference")
        ref = ref.strip()
        if strip_controls(ref) != ref:
            raise RecordError("missing_image", f"image reference {ref[:200]!r} holds control characters")
        root = self.image_root(input_file)
        if "://" in ref:
            proto, rest = ref.split("://", 1)
            proto = proto.lower()
            if proto in REMOTE_SCHEMES:
                raise RecordError("remote_image_refused", f"{ref[:200]}: remote images are never fetched")
            same = _same_protocol(proto, storage.protocol_of(root.uri))
            location = SourcePath(root.fs, posixpath.normpath(rest)) if same else None
        elif os.path.isabs(ref):
            location = SourcePath(root.fs, posixpath.normpath(ref)) if root.is_local else None
        else:
            location = root / ref
        if location is None or not _below(location.path, root.path):
            raise RecordError("image_outside_root", f"{ref[:200]} is outside the images root {root}")
        return location

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


def _same_protocol(a: str, b: str) -> bool:
    return _SAME_PROTOCOL.get(a, a) == _SAME_PROTOCOL.get(b, b)


def _below(path: str, root: str) -> bool:
    """``path`` is ``root`` or lies under it (both normalised, ``/``-separated)."""
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


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
    """``path`` itself, or the files in folder ``path`` matching ``patterns`` (sorted), gzipped
    ones (``x.jsonl.gz``) included. An archive (``.zip``, ``.tar.gz`` ...) is not read."""
    if path.is_file():
        path.check_readable_kind()
        return [path]
    if path.is_dir():
        patterns = list(patterns)
        found = sorted({p for pat in patterns for g in (pat, pat + ".gz") for p in path.glob_files(g)})
        if not found:
            archives = [p.name for p in path.glob_files("*") if p.archive][:8]
            hint = f" (archives are not read, unpack them first: {', '.join(archives)})" if archives else ""
            raise SourceError(f"no input files matching {', '.join(patterns)} in {path}{hint}")
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
    """The same text, whatever the case, spacing, final period or control characters."""
    a, b = normalize_text(strip_controls(a)), normalize_text(strip_controls(b))
    return a.casefold().rstrip(".") == b.casefold().rstrip(".")


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
    items = ((k, strip_controls(v) if isinstance(v, str) else v) for k, v in metadata.items())
    out = {k: v for k, v in items if v is not None and v != "" and v != "NULL"}
    return out or None


def clean_metadata(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """Drop empty / ``"NULL"`` values so metadata carries only what the source says; control
    characters are stripped from its text values (as from the question's texts)."""
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
