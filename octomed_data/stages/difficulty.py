"""Difficulty stage (optional, before distillation): questions -> the questions a grader scored
within a band (:mod:`octomed_data.distill.filtering`); done = the shard's scores marker, complete,
same grader and band."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.distill.filtering import GRADING_VERSION, SCALE, agrade_shard, check_band, scores_uri
from octomed_data.errors import StorageError
from octomed_data.layout import DifficultyFolder, RunPaths
from octomed_data.schema import QUESTION_SCHEMA, SCORE_SCHEMA
from octomed_data.stages.base import Runtime, ShardIncomplete, Stage
from octomed_data.teachers import TeacherConfig, resolve_api_key

COUNTS = ("kept", "dropped", "unscored", "failed")
PASS = ("new_scores", "requests", "retries", "prompt_tokens", "completion_tokens")


class DifficultyStage(Stage):
    """``questions`` -> ``filtered`` (kept questions) + ``OUT/difficulty/scores`` (every answer)."""

    name = "difficulty"

    def __init__(
        self,
        questions: str,
        out: str,
        filtered: str,
        grader: TeacherConfig,
        low: int,
        high: int,
        *,
        api_keys: Mapping[str, str | SecretStr] | None = None,
        max_attempts: int = 6,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        super().__init__(RunPaths.at(out))
        check_band(low, high)
        self.questions, self.out, self.filtered = questions, out, filtered
        self.grader, self.low, self.high = grader, low, high
        self.api_keys = dict(api_keys) if api_keys else None
        self.max_attempts, self.backoff_base_s, self.backoff_max_s = (
            max_attempts,
            backoff_base_s,
            backoff_max_s,
        )
        self.limiter: Any = None
        self.progress: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__) | {"limiter": None, "progress": None}  # per process

    def endpoints(self) -> list[TeacherConfig]:
        return [self.grader]

    def bind(self, runtime: Runtime) -> DifficultyStage:
        """A copy using the runtime's keys (the constructor's win), limiter and progress."""
        other = copy.copy(self)
        other.api_keys = {**runtime.api_keys, **(self.api_keys or {})} or None
        other.limiter = runtime.limiter if runtime.limiter is not None else self.limiter
        other.progress = runtime.progress if runtime.progress is not None else self.progress
        return other

    def input_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.questions, QUESTION_SCHEMA)

    def done_dataset(self) -> storage.Dataset:
        return storage.Dataset(scores_uri(self.out), SCORE_SCHEMA)

    def output_datasets(self) -> list[storage.Dataset]:
        return [self.done_dataset(), storage.Dataset(self.filtered, QUESTION_SCHEMA)]

    def fingerprint(self) -> str:
        g = self.grader
        parts = [g.model, g.params_hash(), GRADING_VERSION, self.low, self.high, self.filtered]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def run_shard(self, shard: str) -> dict[str, Any]:
        key = resolve_api_key(self.grader, self.api_keys)  # a missing key fails before any request
        storage.ensure_writable(self.out)
        storage.ensure_writable(self.filtered)
        report = asyncio.run(
            agrade_shard(
                self.questions,
                shard,
                self.out,
                self.filtered,
                teacher=self.grader,
                key=key,
                low=self.low,
                high=self.high,
                limiter=self.limiter,
                max_attempts=self.max_attempts,
                backoff_base_s=self.backoff_base_s,
                backoff_max_s=self.backoff_max_s,
                progress=self.progress,
                marker=self.marker_extra(shard, {}),
            )
        )
        counts = Counter[str]()
        for c in report["per_source"].values():
            counts.update(c)
        if counts["failed"]:
            raise ShardIncomplete(
                f"shard {shard}: {counts['failed']} question(s) not graded"
                + (f" ({report['aborted']})" if report["aborted"] else "")
            )
        return {k: counts[k] for k in COUNTS} | {k: report[k] for k in PASS}

    def summary(self, shards: Sequence[str], reused: Sequence[str] = ()) -> dict[str, Any]:
        """The filter's result over ``shards`` from their scores markers (``reused``: done before
        this pass, nothing was asked for them)."""
        per_source: dict[str, Counter[str]] = {}
        totals = Counter[str]()
        incomplete: list[str] = []
        aborted = None
        for shard in shards:
            info = self.done_dataset().shard_info(shard)
            extra = info.extra if info is not None else {}
            for source, c in (extra.get("per_source") or {}).items():
                per_source.setdefault(source, Counter()).update(c)
            report = extra.get("report") or {}
            if shard in reused:
                questions = sum(sum(c.values()) for c in (extra.get("per_source") or {}).values())
                totals["stored_before"] += questions
            else:
                totals.update({k: report.get(k) or 0 for k in ("stored_before", *PASS)})
                aborted = aborted or report.get("aborted")
            if not extra.get("complete"):
                incomplete.append(shard)
        counts: Counter[str] = Counter()
        for c in per_source.values():
            counts.update(c)
        return {
            **{k: counts[k] for k in COUNTS},
            "per_source": {s: {k: c[k] for k in COUNTS} for s, c in sorted(per_source.items())},
            "band": [self.low, self.high],
            "scale": list(SCALE),
            "grading_version": GRADING_VERSION,
            "grader": self.grader.name,
            "model": self.grader.model,
            "stored_before": totals["stored_before"],
            **{k: totals[k] for k in PASS},
            "shards": list(shards),
            "incomplete_shards": incomplete,
            "complete": not incomplete and aborted is None,
            "aborted": aborted,
            "uri": self.filtered,
            "scores_uri": scores_uri(self.out),
        }


def filter_by_difficulty(
    questions_uri: str,
    out: str,
    filtered_uri: str,
    *,
    teacher: TeacherConfig,
    low: int,
    high: int,
    api_keys: Mapping[str, str | SecretStr] | None = None,
    shards: Sequence[str] | None = None,
    max_attempts: int = 6,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Grade every question's difficulty with ``teacher`` and keep those scored in ``[low, high]``:
    the difficulty stage run by ``run_stage`` over the (given) shards, then its summary
    (``OUT/difficulty/summary.json``). A shard whose requests failed after all attempts is not
    written to ``filtered_uri`` (the summary lists it; run again)."""
    from octomed_data.stages.local import LocalExecutor, run_stage

    stage = DifficultyStage(
        questions_uri,
        out,
        filtered_uri,
        teacher,
        low,
        high,
        api_keys=api_keys,
        max_attempts=max_attempts,
        backoff_base_s=backoff_base_s,
        backoff_max_s=backoff_max_s,
    )
    resolve_api_key(teacher, api_keys)  # a missing key fails here, before any work
    manifest = stage.input_dataset().committed(lambda info: info.rows)
    names = list(shards) if shards else list(manifest)
    if not names:
        raise StorageError(f"no committed question shards in {questions_uri}")
    absent = [s for s in names if s not in manifest]
    if absent:
        raise StorageError(f"questions shards not committed in {questions_uri}: {', '.join(absent)}")
    if progress:
        from tqdm import tqdm

        total = sum(manifest[s] for s in names)
        stage.progress = tqdm(total=total, unit="sample", desc="grade", file=sys.stderr, dynamic_ncols=True)
    try:
        result = run_stage(stage, LocalExecutor(progress=False), shards=names, force=False)
    finally:
        if stage.progress is not None:
            stage.progress.close()
    reused = [s for s, o in result.outcomes.items() if o.state == "REUSED"]
    summary = stage.summary(names, reused)
    storage.write_json(DifficultyFolder(out).summary, summary)
    return summary
