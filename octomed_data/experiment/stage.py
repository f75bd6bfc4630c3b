"""One arm of an experiment as a stage: a global step (one shard, ``all``) run by ``run_stage``.

Its done-signal is the arm's record (``arms/<arm>/arm.json``): COMPLETED for the same settings
fingerprint and the same data fingerprint (the selection it trains on). What the arm does (mixture,
export, training, evaluation) is the flow's ``job``; the record is written by it, last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from octomed_data.experiment.arms import finished, read_record
from octomed_data.layout import ExperimentPaths
from octomed_data.stages import Stage


class ArmStage(Stage):
    """The arm ``arm`` of the experiment at ``exp`` on the selection ``data_fingerprint``."""

    name = "arm"
    global_step = True

    def __init__(
        self,
        exp: ExperimentPaths,
        arm: str,
        settings: str,
        data_fingerprint: str,
        job: Callable[[], dict[str, Any]],
        *,
        rerun: bool = False,
    ) -> None:
        super().__init__(exp.arm(arm))
        self.exp, self.arm = exp, arm
        self.settings, self.data_fingerprint = settings, data_fingerprint
        self.job = job
        self.rerun = rerun  # run again even when finished (``--force``)

    def fingerprint(self) -> str:
        return self.settings

    def is_done(self, shard: str) -> bool:
        """The arm's record: finished with these settings on this data (its input is the selection)."""
        return not self.rerun and finished(
            read_record(self.exp, self.arm), self.settings, self.data_fingerprint
        )

    def done_counts(self, shard: str) -> dict[str, Any]:
        return read_record(self.exp, self.arm) | {"reused": True}

    def run_shard(self, shard: str) -> dict[str, Any]:
        return self.job()
