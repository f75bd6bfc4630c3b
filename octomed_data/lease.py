"""Leases: one holder at a time for a thing in the store (a shard's writer, a run's checkpoints).

A :class:`Lease` is a small record with an expiry that its holder renews; its epoch is the
holder's fencing token (:func:`octomed_data.storage.fenced`). The stage runner
(:mod:`octomed_data.stages.runner`) holds a shard's lease around every attempt, whatever the
executor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from octomed_data import storage
from octomed_data.errors import OctomedError, StorageError

if TYPE_CHECKING:
    from octomed_data.layout import RunPaths


log = logging.getLogger(__name__)


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

    def _claims(self, floor: int = 0) -> list[int]:
        """Epochs claimed above ``floor`` (the record's epoch) so far, and ``floor``'s own claim.

        An object store answers one prefix listing (``<name>.lease.*``), not the stage's folder.
        A local folder cannot list a prefix without reading every entry (``state/<stage>/`` holds
        a few files per shard: one scan per lease made a pass quadratic in shards), so its claims
        are asked for by name, from ``floor`` up: each taker claims the highest epoch it saw plus
        one, and claims are removed only below a winner's epoch, so those above the record's
        epoch are consecutive."""
        fs, _ = storage.filesystem(self.uri)
        if storage.is_local(fs):
            out = [floor] if floor > 0 and storage.exists(self._claim_uri(floor)) else []
            epoch = floor + 1
            while storage.exists(self._claim_uri(epoch)):
                out.append(epoch)
                epoch += 1
            return out
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
        recorded = int(cur.get("epoch", 0)) if cur else 0
        claims = self._claims(recorded)
        latest = max(claims, default=0)
        if latest > recorded:  # a claim without its record: a takeover in progress, or a dead taker
            claim = self._read(self._claim_uri(latest))
            if claim is None or float(claim.get("claimed_at", 0)) + self.ttl_s > time.time():
                return False  # unreadable counts as in progress: never two takers of one epoch
        epoch = max(latest, recorded) + 1
        if not self._claim(epoch) or max(self._claims(epoch), default=0) > epoch:
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
        if max(self._claims(self.epoch), default=0) > self.epoch:  # a takeover is under way
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
            doc = self._doc() | {"owner": None, "expires_at": 0.0}
            try:
                storage.write_json(self.uri, doc)
            except StorageError as exc:
                # A full disk: rewrite the record in place, else let it expire (never hide the
                # holder's own error behind this one).
                if not storage.overwrite_in_place(self.uri, json.dumps(doc).encode()):
                    log.warning("could not release %s (it expires in %.0f s): %s", self.uri, self.ttl_s, exc)

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
    return Lease(paths.shard_lease(stage, shard), owner, ttl_s)


def new_owner(prefix: str = "") -> str:
    """A unique lease owner id: host, process, random."""
    return f"{prefix}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
