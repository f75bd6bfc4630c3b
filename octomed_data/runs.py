"""Runs: starting and re-opening a run, and the attempt records the dashboard shows.

A run is ``run.json`` (the recipe as run, no secrets) plus the outputs named by
:class:`~octomed_data.layout.RunPaths`. Whether a shard is done is decided only by the storage
layer's committed shard marker (:mod:`octomed_data.stages`); the attempt records written here
(``state/<stage>/<shard>.json``: running, failed with its error, seconds, counts) exist for
people and the shard table, and are never read to decide what to run.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.layout import RunPaths
from octomed_data.recipe import Recipe, parse_recipe

STAGES = (
    "ingest",
    "decontaminate",
    "distill",
    "filter",
    "mixture",
    "export",
    "train",
    "checkpoint",
    "evaluate",
)
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def new_run_id(recipe: Recipe, now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.UTC)
    return f"{recipe.name}-{now.strftime('%Y%m%dT%H%M%S')}-{os.urandom(2).hex()}"


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ConfigError(f"invalid run id {run_id!r} (letters, digits, '_', '-', '.')")
    return run_id


def start_run(recipe: Recipe, run_id: str | None = None, store: str | None = None) -> RunPaths:
    """Create (or re-open) a run: writes ``run.json`` on first use and returns its paths.

    Re-opening an existing run keeps its recorded recipe: a resumed run continues with the
    settings it started with, whatever the recipe file says now.
    """
    paths = RunPaths(store or recipe.store, check_run_id(run_id or new_run_id(recipe)))
    storage.ensure_writable(paths.root)
    if not storage.exists(paths.run_json):
        storage.write_json(
            paths.run_json,
            {
                "run_id": paths.run_id,
                "store": paths.store,
                "created_at": _dt.datetime.now(_dt.UTC).isoformat(),
                "recipe": recipe.public_dict(),
            },
        )
    return paths


def open_run(run_id: str, store: str) -> tuple[Recipe, RunPaths]:
    """The recipe and paths of an existing run (for resume and ``rerun``)."""
    paths = RunPaths(store, check_run_id(run_id))
    if not storage.exists(paths.run_json):
        raise StorageError(f"no run {run_id!r} under {store} (missing {paths.run_json})")
    data = storage.read_json(paths.run_json)
    return parse_recipe(data["recipe"], where=f"recipe of run {run_id}"), paths


def record_shard(paths: RunPaths, stage: str, shard: str, state: str, **info: Any) -> dict[str, Any]:
    """Write one shard's attempt record (RUNNING / COMPLETED / FAILED / SKIPPED) and counts."""
    doc = {
        "stage": stage,
        "shard": shard,
        "state": state,
        "updated_at": _dt.datetime.now(_dt.UTC).isoformat(),
    }
    doc.update(info)
    storage.write_json(paths.state_uri(stage, shard), doc)
    return doc


def shard_states(paths: RunPaths, stage: str | None = None) -> list[dict[str, Any]]:
    """All recorded shard attempts of a run (optionally one stage), in stage then shard order."""
    stages = [stage] if stage else list(STAGES)
    out: list[dict[str, Any]] = []
    for name in stages:
        for uri in storage.list_files(paths.state_dir(name), suffix=".json"):
            out.append(storage.read_json(uri))
    return out


def shard_name(shard: str | int) -> str:
    """``3`` or ``"3"`` -> ``"00003"`` (the storage layer's name for shard 3); names pass through."""
    if isinstance(shard, int) or str(shard).isdigit():
        return storage.Dataset.shard_name(int(shard))
    return storage.Dataset.shard_name(str(shard))
