"""Where an experiment lives and what each arm records.

``STORE/experiments/<name>/``: ``spec.json`` (the spec as run), ``models/`` (the one base model
every arm starts from when the recipe builds a tiny one), ``arms/<arm>/`` (a run-shaped folder:
``filter/accepted`` = the arm's selection, ``mixture``, ``export``, ``checkpoints``, ``evaluation``,
and ``arm.json``, its record), ``items/`` (which evaluated benchmark items have an image, per
protocol), and ``report.md`` + ``comparison.png`` + ``comparison.json`` (+ ``learning_curves.png``
when arms evaluate intermediate checkpoints: ``evaluation.every_steps``; their predictions are in
the arm's ``evaluation/steps/step-<N>/``).

An arm is finished when its record says COMPLETED for the same settings fingerprint (training,
control, protocol) and the same data fingerprint; a re-run reuses it and runs only the others. An
arm whose data and training settings equal an earlier arm's (``train_key``) has no checkpoint of its
own: its record names the arm that trained it (``trained_by``) and it evaluates that checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

from octomed_data import storage
from octomed_data.layout import ExperimentPaths

__all__ = ["ExperimentPaths", "current", "finished", "read_record", "write_record"]


def read_record(paths: ExperimentPaths, arm: str) -> dict[str, Any]:
    uri = paths.record(arm)
    return storage.read_json(uri) if storage.exists(uri) else {}


def write_record(paths: ExperimentPaths, arm: str, record: dict[str, Any]) -> dict[str, Any]:
    record = dict(record) | {"arm": arm, "updated_at": time.time()}
    storage.write_json(paths.record(arm), record)
    return record


def finished(record: dict[str, Any], settings: str, data_fingerprint: str | None = None) -> bool:
    """The arm's record is a finished run of these settings (fingerprint) and, when given, this data."""
    if record.get("status") != "COMPLETED" or record.get("settings") != settings:
        return False
    return data_fingerprint is None or record.get("data", {}).get("fingerprint") == data_fingerprint


def current(record: dict[str, Any], settings: str) -> dict[str, Any]:
    """What the report may use of a record: all of it when finished with these settings; else its
    state only (FAILED / RUNNING of these settings, STALE when made under other settings)."""
    if finished(record, settings):
        return record
    if not record:
        return {"status": "NOT RUN"}
    return {"status": record.get("status") if record.get("settings") == settings else "STALE"}
