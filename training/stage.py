"""Training as a stage: a global step (one shard, ``all``) run by :func:`run_stage` like any other.

Done is the run's training record for the export it trains on (``state/training/<export
fingerprint>.json`` COMPLETED, for the settings the stage names: ``config_hash``): a finished
export is never trained again with the same settings, however often training is triggered (what
other settings do is the job's: :mod:`training.once`). One lease on the run's checkpoint folder (``state/training/checkpoints.lease``,
heartbeat-renewed) keeps two jobs from training into it at once; a trigger for the export another
job trains right now is a no-op (``{"already_trained": True}``), one for another export waits for the folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.runs import checkpoint_lease, export_fingerprint, new_owner, training_record_uri
from octomed_data.stages import Stage, describe_error

# How long a trigger for another export of the same run waits for the job training into the run's
# checkpoint folder (a trigger for the same export does not wait: it is a no-op).
TRAIN_LEASE_WAIT_S = 6 * 3600.0


ALREADY = "already_trained"  # the count of a trigger that found the export trained or in training


class TrainStage(Stage):
    """One SFT job on the run's TRL export (``job``: starts it, returns its result), once per export."""

    name = "train"
    global_step = True

    def __init__(
        self,
        paths: RunPaths,
        job: Callable[[], dict[str, Any]],
        *,
        owner: str | None = None,
        wait_s: float = TRAIN_LEASE_WAIT_S,
        rerun: bool = False,
        config_hash: str | None = None,
    ) -> None:
        super().__init__(paths)
        self.job = job
        self.rerun = rerun  # train again even when this export is trained
        self.config_hash = config_hash  # None: any finished job on this export is done
        self.export = export_fingerprint(paths)  # ConfigError in one line when the run has no export
        self.key = f"{paths.run_id}:{self.export}"
        self.owner = f"{self.key}|{owner or new_owner()}"
        self.wait_s = wait_s

    @property
    def record_uri(self) -> str:
        return training_record_uri(self.paths, self.export)

    def lease_wait_s(self) -> float | None:
        """A trigger for another export waits for the training that runs (hours), as before."""
        return self.wait_s

    def record(self) -> dict[str, Any]:
        return storage.read_json(self.record_uri) if storage.exists(self.record_uri) else {}

    def fingerprint(self) -> str:
        return f"{self.export}:{self.config_hash}" if self.config_hash else self.export

    def is_done(self, shard: str) -> bool:
        """The training record of the export it reads says COMPLETED (the input is the export), for
        the job's settings when the stage names them (``config_hash``)."""
        record = {} if self.rerun else self.record()
        if record.get("state") != "COMPLETED":
            return False
        return self.config_hash is None or record.get("config_hash") == self.config_hash

    def done_counts(self, shard: str) -> dict[str, Any]:
        """The finished job's result, as its record keeps it."""
        return dict(self.record().get("result") or {})

    def trained_elsewhere(self) -> str | None:
        """The job that trains this export right now (its lease on the checkpoint folder), if any:
        asked before the stage runs, so such a trigger is a no-op instead of a wait."""
        holder = checkpoint_lease(self.paths, self.owner).read() or {}
        owner = str(holder.get("owner", ""))
        alive = float(holder.get("expires_at", 0)) > time.time()
        return owner if alive and owner.startswith(f"{self.key}|") and owner != self.owner else None

    def run_shard(self, shard: str) -> dict[str, Any]:
        other = self.trained_elsewhere()
        if other is not None:
            print(f"training: another job ({other}) trains export {self.export} now; nothing to do")
            return {ALREADY: True}
        lease = checkpoint_lease(self.paths, self.owner)
        with lease.hold(wait_s=self.wait_s):
            if self.is_done(shard):  # finished while we waited
                return self.done_counts(shard) | {ALREADY: True}
            storage.write_json(
                self.record_uri,
                {"key": self.key, "state": "RUNNING", "owner": lease.owner, "started": time.time()},
            )
            try:
                result = self.job()
            except BaseException as exc:
                storage.write_json(
                    self.record_uri, {"key": self.key, "state": "FAILED", "error": describe_error(exc)}
                )
                raise
            storage.write_json(
                self.record_uri,
                {"key": self.key, "state": "COMPLETED", "owner": lease.owner, "finished": time.time()}
                | {k: v for k, v in result.items() if isinstance(v, str | int | float | bool)}
                | {"config_hash": self.config_hash, "result": result},
            )
        return result
