"""Evaluation as a stage: a global step (one shard, ``all``) run by :func:`run_stage` like any other.

Done is the evaluation's ``metrics.json``: written last, for the same settings
(:meth:`~octomed_data.job_config.EvalConfig.config_hash`) on the same checkpoint (the hash of its
``checkpoint.json``, so a re-trained checkpoint is evaluated again). A model without a checkpoint
marker (a plain folder, an endpoint) is evaluated on every pass.
"""

from __future__ import annotations

from typing import Any

from evaluation.harness import checkpoint_marker, evaluate, marker_hash
from evaluation.outputs import EvalResult
from octomed_data import storage
from octomed_data.job_config import EvalConfig
from octomed_data.layout import EvaluationFolder, RunPaths
from octomed_data.stages import Stage


class EvaluateStage(Stage):
    """The benchmark harness on one model under one protocol (``config``)."""

    name = "evaluate"
    global_step = True

    def __init__(self, paths: RunPaths, config: EvalConfig) -> None:
        super().__init__(paths)
        self.config = config
        self.output = config.resolved_output_uri()

    def report(self) -> dict[str, Any]:
        uri = EvaluationFolder(self.output).metrics
        return storage.read_json(uri) if storage.exists(uri) else {}

    def fingerprint(self) -> str:
        return self.config.config_hash()

    def is_done(self, shard: str) -> bool:
        """``metrics.json`` of these settings on this checkpoint (its input is the checkpoint)."""
        checkpoint = marker_hash(checkpoint_marker(self.config.model))
        if checkpoint is None:
            return False
        report = self.report()
        return report.get("config_hash") == self.fingerprint() and report.get("checkpoint_hash") == checkpoint

    def done_counts(self, shard: str) -> dict[str, Any]:
        return EvalResult.from_report(self.output, self.report()).to_dict()

    def run_shard(self, shard: str) -> dict[str, Any]:
        return evaluate(self.config, progress=False).to_dict()
