"""``hf``: a Hugging Face dataset as a source, mapped column by column onto the question schema.

INPUT is one of (local or any fsspec URI, e.g. ``s3://``):

* a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder (``state.json`` /
  ``dataset_dict.json`` + Arrow files);
* a Parquet or Arrow file, or a folder of them (a downloaded hub snapshot: ``data/*.parquet``);
* a hub id (``openlifescienceai/medmcqa``) resolved **offline** from the local Hugging Face cache
  (``datasets.load_dataset`` with the hub switched off: no network, ever). An id that is not
  cached is one :class:`~octomed_data.errors.SourceError` line.

Rows are streamed batch by batch (only the mapped columns are read); the whole dataset is never
in memory. ``split`` picks one split of a multi-split dataset (default: all, each row keeping its
split's name); ``mapping`` says which column fills which field (:mod:`.hf_mapping`, with ready
mappings ``medmcqa``, ``medqa``, ``pmc_vqa``). Images (``datasets.Image`` values, bytes or paths)
go through the image store like every loader's.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from octomed_data.errors import OctomedError, SourceError
from octomed_data.schema import RecordError, TaskType, question_row
from octomed_data.sources.base import (
    LoaderContext,
    Record,
    clean_metadata,
    infer_split,
    mcq_row,
    short_answer_task,
)
from octomed_data.sources.hf_mapping import ColumnMap, answer_label, options_of, resolve_mapping
from octomed_data.sources.paths import SourcePath
from octomed_data.sources.readers import has_bad_text

BATCH_ROWS = 64  # rows decoded at a time (image bytes included): memory stays small
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


@dataclass
class Part:
    """One readable piece of the dataset: a file (or a cached hub split) and its split name."""

    split: str
    label: str  # written to rows as input_file
    anchor: SourcePath | None  # relative image paths resolve against its folder (after --images)
    columns: list[str]
    batches: Callable[[list[str]], Iterator[pa.RecordBatch | pa.Table]]
    named: bool = True  # the split name comes from the dataset (not guessed from a file name)


def load_hf(
    ctx: LoaderContext, source: str, mapping: Any = None, config: str | None = None
) -> Iterator[Record]:
    """Hugging Face datasets: a ``save_to_disk`` folder, Parquet/Arrow files (local or URI) or a
    hub id from the local cache (offline); ``mapping`` (``medmcqa``, ``medqa``, ``pmc_vqa`` or a
    dict of columns), ``config`` (the hub dataset's configuration), ``split`` (one split).

    Resolution and the mapping are checked now; records are read when iterated.
    """
    parts = open_parts(source, ctx.split, config)
    if not parts:
        raise SourceError(f"{source}: no rows (no Parquet/Arrow data found)")
    columns = parts[0].columns
    spec = resolve_mapping(mapping, columns)
    for part in parts[1:]:
        missing = [c for c in spec.columns if c not in part.columns]
        if missing:
            raise SourceError(
                f"{part.label}: no column(s) {', '.join(missing)} (columns: {', '.join(part.columns)})"
            )
    return _records(ctx, spec, parts)


def _records(ctx: LoaderContext, spec: ColumnMap, parts: list[Part]) -> Iterator[Record]:
    for part in parts:
        split = ctx.split or infer_split(part.split) or part.split
        index = 0
        for batch in part.batches(spec.columns):
            for row in batch.to_pylist():
                if has_bad_text(row):  # Arrow text is UTF-8 by construction; bytes columns may not be
                    yield ctx.quarantine(part.label, index, "malformed_record", "text is not UTF-8", row)
                else:
                    yield ctx.build(part.label, index, _short(row), _row, ctx, spec, part, row, index, split)
                index += 1


def _short(row: dict[str, Any]) -> dict[str, Any]:
    """The record as quarantine keeps it: image bytes replaced by their size."""
    return {k: _no_bytes(v) for k, v in row.items()}


def _no_bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _no_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_bytes(v) for v in value]
    return value


def _row(
    ctx: LoaderContext, spec: ColumnMap, part: Part, row: dict[str, Any], index: int, split: str
) -> dict:
    question = row.get(spec.question)
    if not isinstance(question, str) or not question.strip():
        raise RecordError("missing_question", f"{spec.question} is empty")
    images, modality = _images(ctx, part, row.get(spec.image)) if spec.image else ([], None)
    metadata = {c: row.get(c) for c in spec.metadata}
    if isinstance(spec.options, tuple):
        options = options_of(None, [row.get(c) for c in spec.options], spec.strip_option_labels)
    else:
        options = options_of(row.get(spec.options), None, spec.strip_option_labels) if spec.options else []
    task = spec.task_type
    if options or (task is not None and task.is_multiple_choice):
        label = answer_label(row.get(spec.answer), spec.answer_format, options)
        answer_text = row.get(spec.answer_text) if spec.answer_text else None
        return mcq_row(
            ctx,
            input_file=part.label,
            index=index,
            split=split,
            question=question,
            options=options,
            answer=label,
            answer_text=answer_text if isinstance(answer_text, str) else None,
            task_type=task or (TaskType.MM_MCQ if images else TaskType.TEXT_MCQ),
            images=images,
            modality=modality,
            metadata=metadata,
        )
    answer = row.get(spec.answer)
    if answer is None or not str(answer).strip():
        raise RecordError("missing_answer", "no gold answer")
    default = TaskType.OPEN_VQA if images else TaskType.OPEN_QA
    return question_row(
        source=ctx.source,
        split=split,
        task_type=task or short_answer_task(str(answer), default),
        question=question,
        answer=str(answer),
        answer_text=str(answer).strip(),
        input_file=part.label,
        record_index=index,
        images=images,
        modality=modality,
        metadata=clean_metadata(metadata),
    )


def _images(ctx: LoaderContext, part: Part, value: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Images of one row: ``datasets.Image`` structs ({bytes, path}), raw bytes or path strings."""
    values = value if isinstance(value, list) else [value]
    out: list[dict[str, Any]] = []
    modality = None
    for v in values:
        if isinstance(v, dict) and v.get("bytes"):
            image, mod = ctx.image_store.put_bytes(v["bytes"], str(v.get("path") or ""))
        elif isinstance(v, bytes | bytearray) and v:
            image, mod = ctx.image_store.put_bytes(bytes(v))
        else:
            ref = v.get("path") if isinstance(v, dict) else v
            if not isinstance(ref, str) or not ref.strip():
                raise RecordError("missing_image", "no image in the row")
            anchor = part.anchor if ctx.images_dir is None else ctx.images_dir / "_"
            if anchor is None:
                raise RecordError("missing_image", f"image not found: {ref} (no --images folder given)")
            image, mod = ctx.image(ref, anchor)
        out.append(image)
        modality = modality or mod
    if not out:
        raise RecordError("missing_image", "no image in the row")
    return out, modality


# ------------------------------------------------------------------------------------------
# Finding the data: save_to_disk folders, Parquet/Arrow files, the local hub cache
# ------------------------------------------------------------------------------------------


def open_parts(source: str, split: str | None, config: str | None) -> list[Part]:
    """The readable parts of ``source`` (one per file or cached split), filtered to ``split``."""
    location: SourcePath | None = None
    try:
        location = SourcePath.of(source)
        found = location.exists()
    except OctomedError:
        found = False  # e.g. "owner/name" read as a relative path that is not there
    if found and location is not None:
        parts = _parts_at(location)
    elif "://" not in source and _HUB_ID.match(source):
        parts = _hub_parts(source, split, config)
    else:
        raise SourceError(f"input path does not exist: {source}")
    if split:
        names = sorted({p.split for p in parts})
        picked = [p for p in parts if p.split == split or infer_split(p.split) == infer_split(split)]
        if not picked and (len(names) > 1 or any(p.named for p in parts)):
            raise SourceError(f"{source}: no split {split!r} (splits: {', '.join(names)})")
        parts = picked or parts  # files of one unnamed split: --split only names them
    return parts


def _parts_at(location: SourcePath) -> list[Part]:
    if location.is_file():
        return [_file_part(location, *_split_name(location.stem))]
    dict_json = location / "dataset_dict.json"
    if dict_json.exists():  # DatasetDict.save_to_disk: one saved Dataset folder per split
        splits = _json_file(dict_json).get("splits") or []
        return [p for name in splits for p in _saved_dataset(location / name, name)]
    if (location / "state.json").exists():
        return _saved_dataset(location, None)
    files = [f for pat in ("**/*.parquet", "**/*.arrow") for f in location.glob_files(pat)]
    files = sorted(
        f for f in files if not any(s.startswith((".", "_")) for s in f.relative_to(location).split("/"))
    )
    if not files:
        raise SourceError(f"{location}: no save_to_disk dataset and no Parquet/Arrow files in this folder")
    return [_file_part(f, *_split_name(f.relative_to(location))) for f in files]


def _json_file(path: SourcePath) -> dict[str, Any]:
    """A ``save_to_disk`` JSON file (``state.json`` ...); a damaged one is a SourceError naming it."""
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data


def _saved_dataset(folder: SourcePath, split: str | None) -> list[Part]:
    """The Arrow files of one ``Dataset.save_to_disk`` folder, in order."""
    state = _json_file(folder / "state.json")
    name, named = (split, True) if split else (state.get("_split"), True)
    if not name:
        name, named = _split_name(folder.name)
    files = [folder / f["filename"] for f in state.get("_data_files") or []]
    return [_file_part(f, str(name), named) for f in files]


def _split_name(name: str) -> tuple[str, bool]:
    """(split, named): ``train-00000-of-00002`` / ``data/validation-0000.parquet`` name their
    split; a file that does not is ``train``, unnamed (``--split`` then names it)."""
    last = name.rsplit("/", 1)[-1]
    m = re.match(r"^([A-Za-z]+)(?:[-_.]|$)", last)
    if m and infer_split(m.group(1)):
        return m.group(1), True
    found = infer_split(name)
    return (found, True) if found else ("train", False)


@contextlib.contextmanager
def _reading(path: SourcePath, kind: str) -> Iterator[None]:
    """A damaged file is one :class:`SourceError` naming it (Arrow's own errors do not)."""
    try:
        yield
    except OctomedError:
        raise
    except (pa.ArrowException, OSError, EOFError) as exc:
        why = " ".join(str(exc).split())[:300]
        raise SourceError(f"{path}: not a readable {kind} file ({type(exc).__name__}: {why})") from None


def _file_part(path: SourcePath, split: str, named: bool) -> Part:
    if path.gzipped:
        raise SourceError(f"{path}: a gzipped Parquet/Arrow file is not read; give the .parquet/.arrow file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        with path.open() as fh, _reading(path, "Parquet"):
            columns = pq.ParquetFile(fh).schema_arrow.names

        def parquet_batches(cols: list[str]) -> Iterator[pa.RecordBatch]:
            with path.open() as fh, _reading(path, "Parquet"):
                yield from pq.ParquetFile(fh).iter_batches(batch_size=BATCH_ROWS, columns=cols)

        return Part(split, path.uri, path, columns, parquet_batches, named)
    if suffix == ".arrow":
        with path.open() as fh, _reading(path, "Arrow"), _arrow_reader(path, fh) as reader:
            columns = reader.schema.names

        def arrow_batches(cols: list[str]) -> Iterator[pa.RecordBatch]:
            with path.open() as fh, _reading(path, "Arrow"), _arrow_reader(path, fh) as reader:
                for batch in reader:
                    batch = batch.select(cols)
                    for start in range(0, batch.num_rows, BATCH_ROWS):
                        yield batch.slice(start, BATCH_ROWS)

        return Part(split, path.uri, path, columns, arrow_batches, named)
    raise SourceError(f"{path}: not a Parquet or Arrow file")


@contextlib.contextmanager
def _arrow_reader(path: SourcePath, fh: Any) -> Iterator[Any]:
    """Batches of an Arrow IPC stream (what ``datasets`` writes) or IPC file."""
    try:
        reader = ipc.open_stream(fh)
    except pa.ArrowInvalid:
        fh.seek(0)
        try:
            file_reader = ipc.open_file(fh)
        except pa.ArrowInvalid as exc:
            raise SourceError(f"{path}: not a readable Arrow file ({exc})") from None
        reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        reader = _WithSchema(reader, file_reader.schema)
    yield reader


class _WithSchema:
    def __init__(self, batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> None:
        self.batches, self.schema = batches, schema

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self.batches


_OFFLINE_LOCK = threading.Lock()
_offline_users = 0
_offline_saved: tuple[bool, bool] | None = None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The hub switched off for ``datasets``/``huggingface_hub`` in this block: cache only.

    The flags are process-wide and ingest entries load concurrently (threads): they are switched on
    by the first block in and restored by the last one out, never while another is inside.
    """
    import datasets
    from huggingface_hub import constants

    global _offline_users, _offline_saved
    with _OFFLINE_LOCK:
        if _offline_users == 0:
            _offline_saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
            datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
        _offline_users += 1
    try:
        yield
    finally:
        with _OFFLINE_LOCK:
            _offline_users -= 1
            if _offline_users == 0 and _offline_saved is not None:
                datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = _offline_saved
                _offline_saved = None


def _hub_parts(hub_id: str, split: str | None, config: str | None) -> list[Part]:
    """The cached splits of hub dataset ``hub_id`` (offline; one clear line when not cached)."""
    import datasets

    with hub_offline():
        try:
            loaded = (
                datasets.load_dataset(hub_id, config, split=split)
                if split
                else datasets.load_dataset(hub_id, config)
            )
        except (ValueError, KeyError) as exc:
            if split and "split" in str(exc).lower():
                raise SourceError(f"{hub_id}: no split {split!r} in the cached dataset") from None
            raise SourceError(_not_cached(hub_id, exc)) from None
        except Exception as exc:  # DatasetNotFoundError, ConnectionError (offline), FileNotFoundError ...
            raise SourceError(_not_cached(hub_id, exc)) from None
    splits = {split: loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    return [_dataset_part(hub_id, str(name), ds) for name, ds in splits.items()]


def _not_cached(hub_id: str, exc: BaseException) -> str:
    import datasets

    why = " ".join(str(exc).split())[:300]
    return (
        f"{hub_id}: no such path, and not a dataset in the local Hugging Face cache "
        f"({datasets.config.HF_DATASETS_CACHE}; the hub is never contacted): {why}"
    )


def _dataset_part(hub_id: str, split: str, ds: Any) -> Part:
    files = [f.get("filename") for f in getattr(ds, "cache_files", []) or [] if f.get("filename")]
    anchor = SourcePath.of(files[0]) if files else None

    def batches(cols: list[str]) -> Iterator[pa.Table]:
        yield from ds.select_columns(cols).with_format("arrow").iter(batch_size=BATCH_ROWS)

    return Part(split, f"{hub_id}:{split}", anchor, list(ds.column_names), batches)
