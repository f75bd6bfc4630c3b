"""Filter stage: rejection sampling over the teacher replies (:mod:`octomed_data.rejection`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from octomed_data import storage
from octomed_data.layout import FilterFolder, RunPaths
from octomed_data.rejection import JUDGE_VERSION, filter_shard
from octomed_data.schema import SAMPLE_SCHEMA, VERDICT_SCHEMA
from octomed_data.stages.base import Stage


class FilterStage(Stage):
    """``distill/raw`` -> ``filter/accepted`` + ``verdicts``, then ``stats.json``; done = ``verdicts``.

    A raw shard re-committed by a later distill run (more samples, a retried failure) makes its
    verdicts stale: :meth:`is_done` compares the raw commit the verdicts were made from.
    """

    name = "filter"

    def __init__(
        self,
        paths: RunPaths,
        *,
        raw: str | None = None,
        questions: str | None = None,
        out: str | None = None,
        samples_per_question: int | None = None,
    ) -> None:
        super().__init__(paths)
        self.raw = raw or paths.raw
        self.questions = questions or paths.questions
        self.out = out or paths.stage("filter")
        self.samples_per_question = samples_per_question

    @property
    def verdicts_uri(self) -> str:
        return FilterFolder(self.out).verdicts

    @property
    def accepted_uri(self) -> str:
        return FilterFolder(self.out).accepted

    @property
    def stats_uri(self) -> str:
        return FilterFolder(self.out).stats

    def input_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.raw, SAMPLE_SCHEMA)

    def done_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.verdicts_uri, VERDICT_SCHEMA)

    def output_datasets(self) -> list[storage.Dataset]:
        return [storage.Dataset(self.accepted_uri, SAMPLE_SCHEMA), self.done_dataset()]

    def fingerprint(self) -> str | None:
        return f"judge={JUDGE_VERSION}"

    def run_shard(self, shard: str) -> dict[str, Any]:
        return filter_shard(
            self.raw,
            self.questions,
            shard,
            self.verdicts_uri,
            self.accepted_uri,
            extra=self.marker_extra(shard, {}),
        )

    def done_counts(self, shard: str) -> dict[str, Any]:
        info = self.done_dataset().shard_info(shard)
        return dict(info.extra.get("counts") or {}) if info is not None else {}

    def finalize(self, shards: Sequence[str]) -> dict[str, Any]:
        """The one statistics pass: ``stats.json``, which the report reads too."""
        from octomed_data.stats import source_statistics

        stats = source_statistics(self.verdicts_uri, self.questions, self.samples_per_question)
        storage.write_json(self.stats_uri, stats)
        return {"stats_uri": self.stats_uri, "stats": stats}
