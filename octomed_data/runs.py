"""Runs: starting and re-opening a run, and the attempt records the dashboard shows.

A run is ``run.json`` (the recipe as run, no secrets) plus the outputs named by
:class:`~octomed_data.layout.RunPaths`. Whether a shard is done is decided only by the storage
layer's committed shard marker (:mod:`octomed_data.stages`); the attempt records written here
(``state/<stage>/<shard>.json``: running, failed with its error, seconds, counts) exist for
people and the shard table, and are never read to decide what to run.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.layout import STAGES as STAGES  # the stage list, named once in layout
from octomed_data.layout import RunPaths
from octomed_data.lease import Lease as Lease  # moved: still importable from here
from octomed_data.lease import LeaseHeld as LeaseHeld
from octomed_data.lease import LeaseLost as LeaseLost
from octomed_data.lease import new_owner as new_owner
from octomed_data.lease import shard_lease as shard_lease
from octomed_data.recipe import Recipe, parse_recipe
from octomed_data.stages.records import record_shard as record_shard
from octomed_data.stages.records import shard_name as shard_name

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


def open_run_folder(target: str, store: str | None = None) -> tuple[Recipe, RunPaths]:
    """A run named by its id (under ``store``) or by its folder (``STORE/runs/<id>``, or a folder
    holding ``run.json`` directly, as the CLI's ``--out`` lays it out)."""
    if store is not None and _RUN_ID.match(target):
        paths = RunPaths(store, target)
        if storage.exists(paths.run_json):
            return open_run(target, store)
    root = target.rstrip("/")
    parent, _, name = root.rpartition("/")
    if parent.rstrip("/").endswith("/runs") or parent == "runs":
        paths = RunPaths(parent.rstrip("/").removesuffix("runs").rstrip("/") or ".", name)
    else:
        paths = RunPaths.at(root)
    if not storage.exists(paths.run_json):
        where = f"under {store} or " if store is not None and _RUN_ID.match(target) else ""
        raise StorageError(f"no run {target!r} {where}at {paths.root} (missing run.json)")
    data = storage.read_json(paths.run_json)
    return parse_recipe(data["recipe"], where=f"recipe of run {paths.run_id}"), paths


def open_run(run_id: str, store: str) -> tuple[Recipe, RunPaths]:
    """The recipe and paths of an existing run (for resume and ``rerun``)."""
    paths = RunPaths(store, check_run_id(run_id))
    if not storage.exists(paths.run_json):
        raise StorageError(f"no run {run_id!r} under {store} (missing {paths.run_json})")
    data = storage.read_json(paths.run_json)
    return parse_recipe(data["recipe"], where=f"recipe of run {run_id}"), paths


# ---------------------------------------------------------------------------------- verify settings
def _verify_changes(old: Any, new: Any) -> list[str]:
    """What differs between two verify settings, briefly (``sources.pathvqa: exact -> judge``)."""
    out = []
    if old.default != new.default:
        out.append(f"default: {old.default} -> {new.default}")
    for src in sorted(set(old.sources) | set(new.sources)):
        a, b = old.sources.get(src), new.sources.get(src)
        if a == b:
            continue
        mode = f"{old.mode_for(src)} -> {new.mode_for(src)}"
        cal = "" if old.calibrates(src) == new.calibrates(src) else f", calibrate {new.calibrates(src)}"
        out.append(f"sources.{src}: {mode}{cal}")
    for key in ("judge", "synonyms", "calibration_samples", "max_attempts"):
        if getattr(old, key) != getattr(new, key):
            out.append(f"{key} changed")
    return out or ["settings changed"]


def change_verify(paths: RunPaths, verify: Any, *, by: str) -> tuple[Recipe, str | None]:
    """Make ``verify`` (:class:`~octomed_data.verify.VerifySettings`) the run's verifier settings.

    Returns the run's recipe with them and one line saying what changed (None when they equal the
    saved ones: nothing is written). ``run.json`` is updated in place (``recipe.verify`` holds the
    settings the run's verdicts are, or are about to be, made with; ``verify_updated_at`` when), so
    a later resume, ``rerun`` or release uses them too; the replaced settings stay in
    ``filter/verify_history.jsonl`` (a ``changed`` line). The filter stage's fingerprint includes
    the settings, so every committed verdict shard is stale from here on and is judged again from
    the stored replies: no distillation request; the judge is asked only what its journal lacks.
    ``verify.judge`` must name one of the run's teachers (a run's teachers do not change).
    """
    from octomed_data.rejection import now_iso, record_verify_history
    from octomed_data.stages.filter import recipe_judge

    if not storage.exists(paths.run_json):
        raise StorageError(f"no run at {paths.root} (missing {paths.run_json})")
    data = storage.read_json(paths.run_json)
    where = f"recipe of run {paths.run_id}"
    recipe = parse_recipe(data["recipe"], where=where)
    if recipe.verify == verify:
        return recipe, None
    new_dict = verify.model_dump(mode="json")
    updated = parse_recipe(
        dict(data["recipe"]) | {"verify": new_dict}, where=f"new verify settings for run {paths.run_id}"
    )
    old_judge, new_judge = recipe_judge(recipe), recipe_judge(updated)
    when = now_iso()
    record_verify_history(
        paths.verify_history,
        {
            "event": "changed",
            "by": by,
            "applied_at": when,
            "from": {
                "verify_fingerprint": recipe.verify.fingerprint(old_judge),
                "settings": recipe.verify.model_dump(mode="json"),
            },
            "to": {"verify_fingerprint": updated.verify.fingerprint(new_judge), "settings": new_dict},
        },
    )
    data["recipe"] = dict(data["recipe"]) | {"verify": new_dict}
    data["verify_updated_at"] = when
    storage.write_json(paths.run_json, data)
    line = (
        f"run {paths.run_id}: verify settings differ from the run's saved ones "
        f"({'; '.join(_verify_changes(recipe.verify, updated.verify))}): the filter re-judges every shard "
        "with the NEW settings from the stored replies (no distillation request; journalled judgements "
        f"are reused); run.json now records them, the old ones are in {paths.verify_history}"
    )
    return updated, line


def shard_states(paths: RunPaths, stage: str | None = None) -> list[dict[str, Any]]:
    """All recorded shard attempts of a run (optionally one stage), in stage then shard order
    (:func:`iter_shard_states`, as a list)."""
    return list(iter_shard_states(paths, stage))


def iter_shard_states(paths: RunPaths, stage: str | None = None) -> Iterator[dict[str, Any]]:
    """Each recorded shard attempt of a run (optionally one stage), in stage then shard order, read
    as it is asked for (a run of 10,000 shards is never held as records).

    An attempt recorded RUNNING whose writer is gone (its shard lease released or expired: the
    process was cancelled, terminated or killed before it could record how it ended) reads as
    FAILED, saying so; a released one is also recorded FAILED, under the shard's lease.
    """
    for name in [stage] if stage else list(STAGES):
        for uri in storage.list_files(paths.state_dir(name), suffix=".json"):
            yield settled_state(paths, storage.read_json(uri))


def settled_state(paths: RunPaths, record: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """``record`` as it stands: a RUNNING attempt without a live writer is FAILED (see
    :func:`shard_states`); any other record as it is."""
    stage, shard = record.get("stage"), record.get("shard")
    if record.get("state") != "RUNNING" or not isinstance(stage, str) or not isinstance(shard, str):
        return record
    lease = Lease(paths.shard_lease(stage, shard), new_owner("settle:"))
    held = lease.read()
    if held is None:  # never leased (written outside the stage runner): nothing to tell
        return record
    released = not held.get("owner")
    if not released and float(held.get("expires_at", 0)) > (now or time.time()):
        return record  # a live writer
    how = "cancelled or stopped" if released else "killed, terminated or cut off (its lease expired)"
    error = f"the attempt ended without recording an outcome: {how}"
    if released and lease.try_acquire():  # no attempt can start while this lease is ours
        try:
            current = storage.read_json(paths.state_uri(stage, shard))
            if current.get("state") == "RUNNING" and current.get("attempt") == record.get("attempt"):
                return record_shard(paths, stage, shard, "FAILED", attempt=record.get("attempt"), error=error)
            return current
        finally:
            lease.release()
    return {**record, "state": "FAILED", "error": error}


def export_fingerprint(paths: RunPaths) -> str:
    """The content hash of the run's TRL export: training's idempotency key is (run, this).

    Streamed file by file (bounded memory whatever the export's size). ConfigError, in one line and
    before anything is written, when the run has no export.
    """
    digest = hashlib.sha256()
    found = False
    for text_only in (True, False):
        ds = storage.Dataset(paths.trl_split(text_only, "train"))
        for name, info in sorted(ds.manifest().items()):
            found = True
            digest.update(f"{text_only}/{name}/{info.rows}\n".encode())
            storage.update_digest(digest, storage.join(ds.uri, info.file))
    if not found:
        raise ConfigError(
            f"run {paths.run_id!r} has no TRL export at {paths.export}: run the export flow first "
            "(nothing was created)"
        )
    return digest.hexdigest()[:16]


def training_record_uri(paths: RunPaths, fingerprint: str) -> str:
    """``state/training/<export fingerprint>.json``: who trained (or trains) this export, and how it ended."""
    return paths.training_record(fingerprint)


def checkpoint_lease(paths: RunPaths, owner: str, ttl_s: float = 60.0) -> Lease:
    """The lease on the run's checkpoint folder: one training job writes into it at a time."""
    return Lease(paths.checkpoint_lease, owner, ttl_s)
