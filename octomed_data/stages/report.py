"""The run report as a global step (:mod:`octomed_data.report`): rewritten only when what it shows changed."""

from __future__ import annotations

import hashlib
from typing import Any

from octomed_data.layout import ReportFolder
from octomed_data.stages.global_step import GlobalStage, file_digest

REPORT_VERSION = "1"


class ReportStage(GlobalStage):
    """``filter/stats.json`` + the run's datasets, attempts and cost -> ``report/report.{md,png}``."""

    name = "report"

    def done_uri(self) -> str:
        return ReportFolder(self.paths.report).done

    def inputs(self) -> list[str]:
        p = self.paths
        return [
            p.ingested, p.quarantine, p.questions, p.removed, p.raw, p.verdicts, p.accepted, p.audit,
            p.mixture_train, p.mixture_validation,
        ]  # fmt: skip

    def settings(self) -> dict[str, Any]:
        from octomed_data.report import run_outputs
        from octomed_data.runs import iter_shard_states

        shards = hashlib.sha256()  # every shard's state, digested as read (never every record held)
        for r in iter_shard_states(self.paths):
            shards.update(f"{r.get('stage')}/{r.get('shard')}:{r.get('state')}\n".encode())
        return {
            "version": REPORT_VERSION,
            "stats": file_digest(self.paths.stats),
            "cost": file_digest(self.paths.cost),
            "outputs": sorted(run_outputs(self.paths)),
            "shards": shards.hexdigest()[:16],
        }

    def build(self) -> dict[str, Any]:
        from octomed_data.report import run_report_parts, run_statistics, write_report

        result = write_report(run_statistics(self.paths), self.paths.report, **run_report_parts(self.paths))
        return {
            "report": result.markdown_uri,
            "plot": result.png_uri,
            "samples": result.stats.samples,
            "accepted": result.stats.accepted,
            "sandbox": result.stats.any_sandbox,
        }
