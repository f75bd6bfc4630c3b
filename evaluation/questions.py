"""A QUESTION_SCHEMA dataset as evaluation input: which rows a config selects, which can be asked
(malformed rows are skipped and counted by reason), streamed file by file."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pyarrow.parquet as pq

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.job_config import EvalConfig
from octomed_data.schema import QUESTION_SCHEMA, TaskType
from training.data import DataFile

NO_SOURCE = "(no source)"  # where a question row without a source is counted


def _selected(row: Mapping[str, Any], config: EvalConfig) -> bool:
    return (config.sources is None or row["source"] in config.sources) and (
        config.task_types is None or row["task_type"] in config.task_types
    )


def scan_questions(files: list[DataFile], config: EvalConfig) -> tuple[int, int]:
    """(questions selected, of which with images), reading only three small columns."""
    selected = with_images = 0
    for f in files:
        fs, path = storage.filesystem(f.uri)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            missing = {"question_id", "task_type", "source", "question", "answer"} - set(
                pf.schema_arrow.names
            )
            if missing:
                raise ConfigError(f"{f.uri} is not a question dataset: missing columns {sorted(missing)}")
            # A dataset without an images column has no image questions.
            cols = [c for c in ("source", "task_type", "images") if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(columns=cols, batch_size=65536):
                for row in batch.to_pylist():
                    if _selected(row, config):
                        selected += 1
                        with_images += int(bool(row.get("images")))
                    if config.limit and selected >= config.limit:
                        return selected, with_images
    return selected, with_images


def question_problem(row: dict[str, Any]) -> str | None:
    """Why a question row cannot be asked and scored (a skip reason), or None when it can.

    Normalises in place what has a safe reading: no ``images`` / ``options`` value -> none.
    """
    if not row.get("question_id"):
        return "missing_question_id"
    if not row.get("source"):
        return "missing_source"
    try:
        task = TaskType(row.get("task_type"))
    except ValueError:
        return "unknown_task_type"
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return "missing_question"
    if row.get("answer") is None or not str(row["answer"]).strip():
        return "missing_answer"
    row["options"] = row.get("options") or []
    row["images"] = row.get("images") or []
    if any(
        not isinstance(o, Mapping) or o.get("label") is None or o.get("text") is None for o in row["options"]
    ):
        return "malformed_options"
    if task.is_multiple_choice and not row["options"]:
        return "missing_options"  # nothing to choose from: the answer could not be read
    if any(not isinstance(im, Mapping) or not im.get("uri") for im in row["images"]):
        return "malformed_images"
    return None


def iter_questions(
    files: list[DataFile], config: EvalConfig, on_skip: Callable[[str, str], None] | None = None
) -> Iterator[dict[str, Any]]:
    """Selected, valid question rows of a dataset, streamed file by file (at most ``config.limit``).

    A selected row that cannot be asked (:func:`question_problem`) is not yielded:
    ``on_skip(source, reason)`` counts it and the run goes on.
    """
    taken = 0
    columns = [f.name for f in QUESTION_SCHEMA]
    for f in files:
        fs, path = storage.filesystem(f.uri)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            cols = [c for c in columns if c in pf.schema_arrow.names]
            for record_batch in pf.iter_batches(columns=cols, batch_size=1024):
                for row in record_batch.to_pylist():
                    if not _selected(row, config):
                        continue
                    problem = question_problem(row)
                    if problem is not None:
                        if on_skip is not None:
                            on_skip(row.get("source") or NO_SOURCE, problem)
                        continue
                    yield row
                    taken += 1
                    if config.limit and taken >= config.limit:
                        return
