"""Source loaders: one per upstream FORMAT, all yielding the one question schema.

``FORMATS`` maps a format name to its :class:`SourceFormat`; :func:`iter_records` is the public
entry point. For every input record a loader yields exactly one
``("question", question_row)`` or ``("quarantine", quarantine_row)``: malformed lines,
missing or invalid answers, answers not among the options, missing or corrupt images and
unreadable DICOM objects are quarantined with a reason, never dropped.
"""

from __future__ import annotations

import inspect
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from octomed_data.errors import ConfigError, OctomedError, SourceError
from octomed_data.images import ImageStore
from octomed_data.sources.base import LoaderContext, Record
from octomed_data.sources.hf import load_hf
from octomed_data.sources.imaging import load_imaging
from octomed_data.sources.paths import SourcePath
from octomed_data.sources.text import (
    load_headqa,
    load_medbullets,
    load_medmcqa,
    load_medqa,
    load_medxpertqa,
    load_mmlu,
    load_mmlu_pro,
    load_pubmedqa,
)
from octomed_data.sources.vqa import load_omnimedvqa, load_pathvqa, load_pmc_vqa, load_slake, load_vqa_rad

__all__ = ["FORMATS", "SourceFormat", "iter_records", "LoaderContext", "Record"]

# Options every format accepts: the split override and the source name written to rows.
COMMON_OPTIONS = ("split", "source")


@dataclass(frozen=True)
class SourceFormat:
    """A named upstream format: its loader and the ``--option`` keys it accepts."""

    name: str
    load: Callable[..., Iterator[Record]]
    multimodal: bool
    ids: bool = False  # INPUT may be a dataset id, not only a path or URI

    @property
    def options(self) -> tuple[str, ...]:
        params = list(inspect.signature(self.load).parameters)[2:]  # after (ctx, path)
        return COMMON_OPTIONS + tuple(params)

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.load) or ""
        return doc.split("\n\n")[0].replace("\n", " ")


FORMATS: dict[str, SourceFormat] = {
    f.name: f
    for f in (
        SourceFormat("medqa", load_medqa, False),
        SourceFormat("medmcqa", load_medmcqa, False),
        SourceFormat("pubmedqa", load_pubmedqa, False),
        SourceFormat("mmlu", load_mmlu, False),
        SourceFormat("mmlu_pro", load_mmlu_pro, False),
        SourceFormat("medxpertqa", load_medxpertqa, True),
        SourceFormat("medbullets", load_medbullets, False),
        SourceFormat("vqa_rad", load_vqa_rad, True),
        SourceFormat("slake", load_slake, True),
        SourceFormat("pathvqa", load_pathvqa, True),
        SourceFormat("omnimedvqa", load_omnimedvqa, True),
        SourceFormat("pmc_vqa", load_pmc_vqa, True),
        SourceFormat("headqa", load_headqa, False),
        SourceFormat("imaging", load_imaging, True),
        SourceFormat("hf", load_hf, True, ids=True),
    )
}


def get_format(fmt: str) -> SourceFormat:
    """The format named ``fmt``; an unknown name is one clear error listing the known ones."""
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ConfigError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}") from None


def iter_records(
    fmt: str,
    input_path: str,
    *,
    image_store: ImageStore | None = None,
    images_dir: str | None = None,
    counts: Counter[str] | None = None,
    **options: Any,
) -> Iterator[Record]:
    """Yield ``(kind, row)`` for every record of ``input_path`` read as ``fmt``.

    ``input_path`` is a local path or any fsspec URI (``s3://bucket/x.jsonl``, ``file://``), a
    file or a folder; for ``hf`` also a dataset id resolved from the local Hugging Face cache.
    ``kind`` is ``"question"`` (a :data:`~octomed_data.schema.QUESTION_SCHEMA` row) or
    ``"quarantine"`` (a :data:`~octomed_data.schema.QUARANTINE_SCHEMA` row). ``images_dir``
    is where relative image references resolve (else the input file's folder);
    ``image_store`` stores the normalised images (``None``: fingerprint only, nothing
    stored). ``options``: ``split`` (override), ``source`` (name written to rows, default
    the format name), and per-format keys (see ``FORMATS[fmt].options``). Unknown format,
    unknown option, nonexistent path or an archive (``.zip`` ...) raise
    :class:`~octomed_data.errors.OctomedError` before anything is read; a file that cannot be
    read as the format is a :class:`~octomed_data.errors.SourceError` naming the input.
    ``counts``, when given, receives what was cleaned on the way
    (:attr:`LoaderContext.counts <octomed_data.sources.base.LoaderContext>`).
    """
    spec = get_format(fmt)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for format {fmt}; accepted: {', '.join(spec.options)}"
        )
    target: SourcePath | str
    if spec.ids:
        target = str(input_path)  # a path, a URI or a dataset id: the loader resolves it
    else:
        target = SourcePath.of(input_path)
        if not target.exists():
            raise SourceError(f"input path does not exist: {input_path}")
        if target.archive and target.is_file():  # a folder named x.zip is a folder
            target.check_readable_kind()
    img_dir = SourcePath.of(images_dir) if images_dir else None
    if img_dir is not None and not img_dir.is_dir():
        raise SourceError(f"images folder does not exist: {images_dir}")
    split = options.pop("split", None)
    source = options.pop("source", None) or fmt
    ctx = LoaderContext(
        fmt=fmt,
        source=str(source),
        image_store=image_store if image_store is not None else ImageStore(None),
        images_dir=img_dir,
        split=str(split) if split else None,
        counts=counts if counts is not None else Counter(),
    )
    try:
        records = spec.load(ctx, target, **options)
    except READ_ERRORS as exc:
        raise _named(str(input_path), exc) from exc
    return _naming_errors(records, str(input_path))


# What third-party readers raise on a damaged file (Arrow, gzip, decoding, I/O): re-raised as a
# SourceError naming the input, so no reader error reaches the user without the file's name.
READ_ERRORS = (OSError, EOFError, UnicodeError, zlib.error, pa.ArrowException)


def _named(where: str, exc: BaseException) -> SourceError:
    msg = " ".join(str(exc).split())[:500] or type(exc).__name__
    return SourceError(msg if where in msg else f"{where}: {type(exc).__name__}: {msg}")


def _naming_errors(records: Iterator[Record], where: str) -> Iterator[Record]:
    try:
        yield from records
    except OctomedError:
        raise
    except READ_ERRORS as exc:
        raise _named(where, exc) from exc
