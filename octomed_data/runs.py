"""Runs: starting and re-opening a run, and the attempt records the dashboard shows.

A run is ``run.json`` (the recipe as run, no secrets) plus the outputs named by
:class:`~octomed_data.layout.RunPaths`. Whether a shard is done is decided only by the storage
layer's committed shard marker (:mod:`octomed_data.stages`); the attempt records written here
(``state/<stage>/<shard>.json``: running, failed with its error, seconds, counts) exist for
people and the shard table, and are never read to decide what to run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError, OctomedError, StorageError
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


def record_shard(paths: RunPaths, stage: str, shard: str, state: str, **info: Any) -> dict[str, Any]:
    """Write one shard's attempt record (RUNNING / COMPLETED / FAILED / SKIPPED) and counts."""
    uri = paths.state_uri(stage, shard)
    now = _dt.datetime.now(_dt.UTC)
    doc = {"stage": stage, "shard": shard, "state": state, "updated_at": now.isoformat()}
    doc.update(info)
    attempt = info.get("attempt")
    if isinstance(attempt, int) and not info.get("reused"):
        _add_total_seconds(uri, doc, attempt, now)
    storage.write_json(uri, doc)
    return doc


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


# ------------------------------------------------------------------------------------------ leases
class LeaseHeld(OctomedError):
    """Another job holds the lease (a shard's writer, a run's checkpoint folder)."""


class LeaseLost(LeaseHeld):
    """This job held the lease and another took it over: it must not write again."""


class Lease:
    """One holder at a time for a thing in the store, with an expiry renewed by its holder.

    ``<name>.lease`` holds ``{owner, epoch, expires_at}`` (wall clock, seconds). Taking a lease
    that is free, released or expired means winning the claim ``<name>.lease.<epoch+1>``, a
    write-if-absent (``link()`` on a local store, a conditional PUT on S3, "write, settle, read
    back" elsewhere): of jobs racing for one takeover exactly one wins, and epochs only grow.

    The epoch is the holder's fencing token. It holds the lease while the record names it at its
    epoch and has not expired (:meth:`held`); :meth:`renew` (every ``ttl_s / 3``) also gives up
    when a later claim exists. Inside :meth:`fence` (and :meth:`hold`) every data write of the
    shard checks :meth:`held` first, so a writer whose lease was taken over publishes nothing more.
    """

    def __init__(self, uri: str, owner: str, ttl_s: float = 30.0, settle_s: float = 0.2) -> None:
        self.uri = uri
        self.owner = owner
        self.ttl_s = ttl_s
        self.settle_s = settle_s
        self.epoch = 0

    def __repr__(self) -> str:
        return f"Lease({self.uri!r}, owner={self.owner!r}, epoch={self.epoch})"

    def read(self) -> dict[str, Any] | None:
        """The current lease record (None: nobody ever held it, or it cannot be read)."""
        return self._read(self.uri)

    @staticmethod
    def _read(uri: str) -> dict[str, Any] | None:
        try:
            return storage.read_json(uri) if storage.exists(uri) else None
        except (StorageError, ValueError):
            return None

    def _doc(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.owner,
            "epoch": self.epoch,
            "expires_at": now + self.ttl_s,
            "renewed_at": now,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    # ---- claims: <name>.lease.<epoch>, one winner each
    def _claim_uri(self, epoch: int) -> str:
        return f"{self.uri}.{epoch:010d}"

    def _claims(self) -> list[int]:
        """Epochs claimed so far: one prefix listing (``<name>.lease.*``), not the stage's folder."""
        base = self.uri.rsplit("/", 1)[-1]
        out = []
        for uri in storage.list_prefixed(self.uri + "."):
            tail = uri.rsplit("/", 1)[-1][len(base) + 1 :]
            if tail.isdigit():
                out.append(int(tail))
        return sorted(out)

    def _claim(self, epoch: int) -> bool:
        uri = self._claim_uri(epoch)
        doc = {"owner": self.owner, "claimed_at": time.time()}
        made = storage.create_exclusive(uri, json.dumps(doc).encode())
        if made is not None:
            return made
        if storage.exists(uri):  # a store without exclusive writes: write, settle, read back
            return False
        storage.write_json(uri, doc)
        time.sleep(self.settle_s)
        return (self._read(uri) or {}).get("owner") == self.owner

    def try_acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours; False when someone else holds it."""
        cur = self.read()
        if cur is not None and cur.get("owner") == self.owner:
            self.epoch = int(cur.get("epoch", 0))
            return self.renew()
        if cur is not None and cur.get("owner") and float(cur.get("expires_at", 0)) > time.time():
            return False
        claims = self._claims()
        recorded = int(cur.get("epoch", 0)) if cur else 0
        latest = max(claims, default=0)
        if latest > recorded:  # a claim without its record: a takeover in progress, or a dead taker
            claim = self._read(self._claim_uri(latest))
            if claim is None or float(claim.get("claimed_at", 0)) + self.ttl_s > time.time():
                return False  # unreadable counts as in progress: never two takers of one epoch
        epoch = max(latest, recorded) + 1
        if not self._claim(epoch) or max(self._claims(), default=0) > epoch:
            return False
        self.epoch = epoch
        storage.write_json(self.uri, self._doc())
        for old in claims:  # earlier claims are spent (best effort)
            if old < epoch:
                fs, path = storage.filesystem(self._claim_uri(old))
                with contextlib.suppress(Exception):
                    fs.rm(path)
        return self.held()

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.5) -> Lease:
        """Take the lease, waiting up to ``wait_s`` for the holder to finish or expire."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.try_acquire():
                return self
            if time.monotonic() >= deadline:
                cur = self.read() or {}
                left = max(0.0, float(cur.get("expires_at", 0)) - time.time())
                raise LeaseHeld(
                    f"{self.uri} is held by {cur.get('owner')!r} (host {cur.get('host')}, "
                    f"expires in {left:.0f} s)"
                )
            time.sleep(poll_s)

    def renew(self) -> bool:
        """Extend the lease; False (and nothing written) when another owner took it meanwhile."""
        cur = self.read()
        if cur is None or cur.get("owner") != self.owner or int(cur.get("epoch", 0)) != self.epoch:
            return False
        if max(self._claims(), default=0) > self.epoch:  # a takeover is under way
            return False
        storage.write_json(self.uri, self._doc())
        return True

    def held(self) -> bool:
        """This owner holds the lease at its epoch, unexpired (checked before every fenced write)."""
        cur = self.read()
        return (
            cur is not None
            and cur.get("owner") == self.owner
            and int(cur.get("epoch", 0)) == self.epoch
            and float(cur.get("expires_at", 0)) > time.time()
        )

    def check(self, uri: str = "") -> None:
        """Raise :class:`LeaseLost` unless this owner still holds the lease (the write fence)."""
        if not self.held():
            holder = (self.read() or {}).get("owner")
            raise LeaseLost(
                f"{self.uri}: lost to {holder!r} (epoch {self.epoch} is over); "
                f"not writing {uri.rsplit('/', 1)[-1] or 'anything'}"
            )

    def fence(self) -> contextlib.AbstractContextManager[None]:
        """Every shard data write in this context (and tasks started in it) checks the lease first."""
        return storage.fenced(self.check)

    def release(self) -> None:
        """Give the lease up (only if it is still ours); the epoch stays, so epochs only grow."""
        if self.held():
            storage.write_json(self.uri, self._doc() | {"owner": None, "expires_at": 0.0})

    @contextlib.contextmanager
    def hold(self, wait_s: float = 0.0, on_lost: Any = None) -> Iterator[Lease]:
        """Hold the lease for a block, renewed by a heartbeat thread every ``ttl_s / 3``; shard data
        writes in the block are fenced by it.

        ``on_lost()`` is called (once) if another owner takes the lease meanwhile.
        """
        self.acquire(wait_s)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl_s / 3):
                try:
                    ok = self.renew()
                except Exception:  # a store hiccup: try again next beat, the TTL has room
                    continue
                if not ok:
                    if on_lost is not None:
                        on_lost()
                    return

        thread = threading.Thread(target=beat, name=f"lease {self.uri}", daemon=True)
        thread.start()
        try:
            with self.fence():
                yield self
        finally:
            stop.set()
            thread.join(timeout=5)
            self.release()


def shard_lease(paths: RunPaths, stage: str, shard: str, owner: str, ttl_s: float = 30.0) -> Lease:
    """The one-writer lease of a shard: ``state/<stage>/<shard>.lease``."""
    return Lease(storage.join(paths.state_dir(stage), f"{shard}.lease"), owner, ttl_s)


def training_dir(paths: RunPaths) -> str:
    """Where training's bookkeeping lives: ``state/training/`` (not a shard stage)."""
    return storage.join(paths.root, "state", "training")


def export_fingerprint(paths: RunPaths) -> str:
    """The content hash of the run's TRL export: training's idempotency key is (run, this).

    Streamed file by file (bounded memory whatever the export's size). ConfigError, in one line and
    before anything is written, when the run has no export.
    """
    digest = hashlib.sha256()
    found = False
    for text_only in (True, False):
        ds = storage.Dataset(storage.join(paths.trl_export(text_only), "train"))
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
    return storage.join(training_dir(paths), f"{fingerprint}.json")


def checkpoint_lease(paths: RunPaths, owner: str, ttl_s: float = 60.0) -> Lease:
    """The lease on the run's checkpoint folder: one training job writes into it at a time."""
    return Lease(storage.join(training_dir(paths), "checkpoints.lease"), owner, ttl_s)


def new_owner(prefix: str = "") -> str:
    """A unique lease owner id: host, process, random."""
    return f"{prefix}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
