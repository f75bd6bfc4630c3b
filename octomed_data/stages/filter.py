"""Filter stage: rejection sampling over the teacher replies (:mod:`octomed_data.rejection`)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.audit import AuditSettings
from octomed_data.errors import ConfigError
from octomed_data.layout import FilterFolder, RunPaths
from octomed_data.prompts import JUDGE_RUBRIC_VERSION
from octomed_data.rejection import JUDGE_VERSION, filter_shard, record_verify_history
from octomed_data.schema import ACCEPTED_SCHEMA, SAMPLE_SCHEMA, VERDICT_SCHEMA
from octomed_data.stages.base import Runtime, ShardIncomplete, Stage
from octomed_data.teachers import TeacherConfig, resolve_api_key
from octomed_data.verify import VerifySettings
from octomed_data.verify.judge import JudgeEndpoint, JudgeIncomplete

if TYPE_CHECKING:
    from octomed_data.recipe import Recipe

# The judge's URL is not in the verdicts' fingerprint (its model and sampling are): a stand-in URL
# resolves a sandbox-bound judge well enough to decide which shards are done, without a server.
NO_SANDBOX_URL = "http://sandbox.invalid/v1"


def recipe_judge(recipe: Recipe, sandbox_url: str | None = NO_SANDBOX_URL) -> TeacherConfig | None:
    """The recipe's judge teacher as the filter resolves it (None: no source uses a judge)."""
    if not recipe.verify.needs_judge:
        return None
    return recipe.judge_teacher(recipe.distill_config(sandbox_url=sandbox_url))


class FilterStage(Stage):
    """``distill/raw`` -> ``filter/accepted`` + ``verdicts``, then ``stats.json``; done = ``verdicts``.

    A raw shard re-committed by a later distill run (more samples, a retried failure) makes its
    verdicts stale: :meth:`is_done` compares the raw commit the verdicts were made from. The
    verifier settings (``verify``) and the judge teacher are part of the fingerprint: changing
    them judges every shard again (judgements already journalled are not requested again; no
    distillation request: only ``distill/raw`` is read). A run's settings are changed with
    :func:`octomed_data.runs.change_verify` (``run.json``); :meth:`finalize` writes the ``judged``
    line of ``filter/verify_history.jsonl`` for the settings that made every shard's verdicts.
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
        verify: VerifySettings | None = None,
        judge: TeacherConfig | None = None,
        api_keys: Mapping[str, str | SecretStr] | None = None,
        limiter: Any = None,
        audit: AuditSettings | None = None,
    ) -> None:
        super().__init__(paths)
        self.raw = raw or paths.raw
        self.questions = questions or paths.questions
        self.out = out or paths.stage("filter")
        self.samples_per_question = samples_per_question
        self.verify = verify or VerifySettings()
        # The gold-label audit's rules: not in the fingerprint, the statistics pass redoes the audit.
        self.audit = audit or AuditSettings()
        if self.verify.needs_judge and judge is None:
            raise ConfigError("the verify settings use an LLM judge, but no judge teacher was given")
        self.judge = judge if self.verify.needs_judge else None
        self.api_keys = dict(api_keys) if api_keys else None
        self.limiter = limiter

    @classmethod
    def for_recipe(
        cls, paths: RunPaths, recipe: Recipe, judge: TeacherConfig | None = None, **kwargs: Any
    ) -> FilterStage:
        """The run's filter stage as its recipe defines it (``judge``: a live one, else a stand-in
        that is enough to decide which shards are done)."""
        if judge is None:
            judge = recipe_judge(recipe)
        return cls(
            paths,
            samples_per_question=recipe.distill.samples,
            verify=recipe.verify,
            judge=judge,
            audit=recipe.audit,
            **kwargs,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(limiter=None)  # per process
        return state

    def endpoints(self) -> list[TeacherConfig]:
        """The judge, when a source uses one (executors resolve its key and rate limit)."""
        return [self.judge] if self.judge is not None else []

    def bind(self, runtime: Runtime) -> FilterStage:
        """A copy using this process's keys (SecretStr) and shared rate limiter."""
        other = copy.copy(self)
        other.api_keys = {**runtime.api_keys, **(self.api_keys or {})} or None  # keys given win
        other.limiter = runtime.limiter if runtime.limiter is not None else self.limiter
        return other

    @property
    def verdicts_uri(self) -> str:
        return FilterFolder(self.out).verdicts

    @property
    def accepted_uri(self) -> str:
        return FilterFolder(self.out).accepted

    @property
    def stats_uri(self) -> str:
        return FilterFolder(self.out).stats

    @property
    def judge_journal(self) -> str:
        return FilterFolder(self.out).judge

    def input_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.raw, SAMPLE_SCHEMA)

    def done_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.verdicts_uri, VERDICT_SCHEMA)

    def output_datasets(self) -> list[storage.Dataset]:
        return [storage.Dataset(self.accepted_uri, ACCEPTED_SCHEMA), self.done_dataset()]

    def fingerprint(self) -> str | None:
        return f"judge={JUDGE_VERSION}|verify={self.verify.fingerprint(self.judge)}"

    def judge_endpoint(self) -> JudgeEndpoint | None:
        """The judge with its key (bound, else its env variable; a simulated judge needs none)."""
        if self.judge is None:
            return None
        key = resolve_api_key(self.judge, self.api_keys)
        return JudgeEndpoint(
            self.judge, key, self.judge_journal, max_attempts=self.verify.max_attempts, limiter=self.limiter
        )

    def run_shard(self, shard: str) -> dict[str, Any]:
        try:
            return filter_shard(
                self.raw,
                self.questions,
                shard,
                self.verdicts_uri,
                self.accepted_uri,
                extra=self.marker_extra(shard, {}),
                verify=self.verify,
                judge_endpoint=self.judge_endpoint(),
            )
        except JudgeIncomplete as exc:
            raise ShardIncomplete(str(exc)) from None

    def finalize(self, shards: Sequence[str]) -> dict[str, Any]:
        """The one statistics pass: ``stats.json``, which the report reads too. Skipped when the
        verdicts it would read are the ones the last ``stats.json`` summarised (its ``basis``)."""
        from octomed_data.stats import source_statistics
        from octomed_data.verify.judge import judge_cost

        basis = self.done_basis(
            shards,
            fingerprint=self.fingerprint(),
            audit=self.audit.model_dump(mode="json"),
            samples=self.samples_per_question,
            judge_journal=storage.exists(self.judge_journal),
        )
        if storage.exists(self.stats_uri):
            previous = storage.read_json(self.stats_uri)
            if previous.get("basis") == basis:
                return {"stats_uri": self.stats_uri, "stats": previous, "reused": True}
        stats = source_statistics(
            self.verdicts_uri,
            self.questions,
            self.samples_per_question,
            audit=self.audit,
            audit_uri=FilterFolder(self.out).audit,
            verify=self.verify,
        )
        verifier = stats.setdefault("verifier", {})
        verifier["settings"] = self.verify.model_dump(mode="json")
        verifier["fingerprint"] = self.verify.fingerprint(self.judge)
        verifier["judge"] = self.judge_info()
        if self.judge is not None or storage.exists(self.judge_journal):
            verifier["judge_cost"] = judge_cost(self.judge_journal, self.judge)
        stats["basis"] = basis
        storage.write_json(self.stats_uri, stats)
        self.record_history(shards, stats)
        return {"stats_uri": self.stats_uri, "stats": stats}

    def judge_info(self) -> dict[str, Any] | None:
        """The judge as the history and the stats name it (no URL, no key)."""
        if self.judge is None:
            return None
        return {
            "name": self.judge.name,
            "model": self.judge.model,
            "params_hash": self.judge.params_hash(),
            "rubric_version": JUDGE_RUBRIC_VERSION,
        }

    @property
    def history_uri(self) -> str:
        return FilterFolder(self.out).verify_history

    def record_history(self, shards: Sequence[str], stats: Mapping[str, Any]) -> dict[str, Any]:
        """The ``judged`` line of ``verify_history.jsonl``: these settings made every shard's verdicts."""
        verified: Counter[str] = Counter()
        judge: Counter[str] = Counter()
        for shard in shards:
            counts = self.done_counts(shard)
            verified.update(counts.get("verified_by") or {})
            for key in ("judge_requests", "judged_new"):
                judge[key] += int(counts.get(key) or 0)
        overall = stats.get("overall") or {}
        entry = {
            "event": "judged",
            "fingerprint": self.fingerprint(),
            "verify_fingerprint": self.verify.fingerprint(self.judge),
            "judge_version": JUDGE_VERSION,
            "settings": self.verify.model_dump(mode="json"),
            "judge": self.judge_info(),
            "shards": len(shards),
            "samples": overall.get("samples"),
            "accepted": overall.get("accepted"),
            "verified_by": dict(sorted(verified.items())),
            "judge_requests": judge["judge_requests"],
            "judged_new": judge["judged_new"],
            "calibration": ((stats.get("verifier") or {}).get("calibration") or {}).get("overall"),
        }
        return record_verify_history(self.history_uri, entry)
