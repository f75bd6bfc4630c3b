"""Attempt records: ``state/<stage>/<shard>.json`` (running, failed with its error, seconds,
counts), written by the stage runner for people and the shard table, never read to decide what runs."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from octomed_data import storage
from octomed_data.errors import StorageError
from octomed_data.release_safety import SecretGuard

if TYPE_CHECKING:
    from octomed_data.layout import RunPaths

log = logging.getLogger(__name__)

# An attempt that ended without its output: recorded even when the store is full.
ENDED_BADLY = frozenset({"FAILED", "CANCELLED"})

# The fields the runner itself writes on an attempt record; any other field is the stage's own
# (its counts, or a live status it puts there while it runs, e.g. a batch's state).
RECORD_KEYS = frozenset(
    {"stage", "shard", "state", "attempt", "seconds", "updated_at", "reused", "error"}
    | {"previous_seconds", "total_seconds", "node_id"}
)


def ended_state(exc: BaseException) -> str:
    """How an attempt that raised ``exc`` ended: CANCELLED when it was interrupted (Ctrl-C, SIGTERM
    through the CLI, a cancelled task or process exit), else FAILED."""
    import asyncio

    return (
        "CANCELLED" if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError) else "FAILED"
    )


def record_shard(paths: RunPaths, stage: str, shard: str, state: str, **info: Any) -> dict[str, Any]:
    """Write one shard's attempt record (RUNNING / COMPLETED / FAILED / CANCELLED / SKIPPED) and
    counts. A FAILED or CANCELLED record never raises (a full disk: rewritten in place, or logged)."""
    uri = paths.state_uri(stage, shard)
    now = _dt.datetime.now(_dt.UTC)
    doc = {"stage": stage, "shard": shard, "state": state, "updated_at": now.isoformat()}
    doc.update(info)
    if isinstance(doc.get("error"), str):  # an error text may quote a key, in any encoding
        doc["error"] = SecretGuard.from_process_env().scrub(doc["error"])
    attempt = info.get("attempt")
    if isinstance(attempt, int) and not info.get("reused"):
        _add_total_seconds(uri, doc, attempt, now)
    if state == "RUNNING":
        _clean_temp_files(paths, stage)
    try:
        storage.write_json(uri, doc)
    except StorageError as exc:
        if state not in ENDED_BADLY:
            raise
        # A full disk (no room for the atomic write's temp file) must not leave the shard RUNNING,
        # nor replace the shard's own error with this one: rewrite the record in place, and if even
        # that fails, log it and let the shard's error go on.
        data = json.dumps(doc, indent=2, sort_keys=True, default=str).encode("utf-8")
        if not storage.overwrite_in_place(uri, data):
            log.warning("could not record %s shard %s as %s: %s", stage, shard, state, exc)
    return doc


def _clean_temp_files(paths: RunPaths, stage: str) -> None:
    """A new attempt clears dead writers' temp files from the stage's state folder."""
    try:
        storage.clean_temp_files(paths.state_dir(stage))
    except StorageError as exc:  # housekeeping: never fails a shard
        log.warning("could not clean temp files in %s: %s", paths.state_dir(stage), exc)


def _add_total_seconds(uri: str, doc: dict[str, Any], attempt: int, now: _dt.datetime) -> None:
    """``total_seconds``: this attempt's seconds plus every earlier attempt's (retries included).

    Each record carries ``previous_seconds`` (the earlier attempts' sum); an attempt that died
    without saying how long it ran is counted from its RUNNING record's time.
    """
    prev: dict[str, Any] = {}
    if attempt > 1 or doc["state"] != "RUNNING":
        try:
            prev = storage.read_json(uri) if storage.exists(uri) else {}
        except (StorageError, ValueError):
            prev = {}
    previous = 0.0
    if prev.get("attempt") == attempt:
        previous = float(prev.get("previous_seconds") or 0.0)
        if doc.get("seconds") is None and prev.get("state") == "RUNNING" and doc["state"] != "RUNNING":
            started = _dt.datetime.fromisoformat(prev["updated_at"])
            doc["seconds"] = round((now - started).total_seconds(), 3)
    elif attempt > 1 and prev.get("attempt") == attempt - 1:
        previous = float(prev.get("total_seconds") or prev.get("seconds") or 0.0)
    doc["previous_seconds"] = round(previous, 3)
    doc["total_seconds"] = round(previous + float(doc.get("seconds") or 0.0), 3)


def shard_name(shard: str | int) -> str:
    """``3`` or ``"3"`` -> ``"00003"`` (the storage layer's name for shard 3); names pass through."""
    if isinstance(shard, int) or str(shard).isdigit():
        return storage.Dataset.shard_name(int(shard))
    return storage.Dataset.shard_name(str(shard))


def interned(counts: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a marker's counts whose keys (also of nested counts) are interned: a pass holds one
    such dict per done shard, and the keys, parsed anew from every marker, were half its bytes."""
    return {sys.intern(k): interned(v) if isinstance(v, Mapping) else v for k, v in counts.items()}
