"""The verifier of open-ended answers: exact, normalized or LLM-judged, selectable per source.

Closed questions (multiple choice, yes/no/maybe) have one right label and keep exact match. An
open-ended answer ("left lower lobe", "0.5 cm") can be right in many words, so a source's
open-ended replies are verified by its ``mode`` (the recipe's ``verify:`` block):

* ``exact``: :func:`octomed_data.answers.is_correct` (normalised text equality), as before;
* ``normalized``: :mod:`.match` (numbers and units, plurals, a versioned medical synonym table
  plus the user's groups);
* ``judge``: an answer that normalized matching accepts is accepted without a request; the rest
  go to an LLM judge (any OpenAI-compatible teacher, through the one inference client) with the
  versioned rubric :data:`~octomed_data.prompts.JUDGE_SYSTEM_PROMPT`. Judgements are journalled
  (:mod:`.judge`), so a crashed or repeated filter pays for none twice.

**Calibration**: for a source in ``judge`` mode (or with ``calibrate: true``), up to
``calibration_samples`` closed replies per shard are judged too, as if open-ended; their verdict
stays exact match's, and the judge's is stored beside it (``judge_correct``), so the statistics
report the judge's precision and recall against exact match (:mod:`.calibration`) before anyone
trusts it on open questions.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from octomed_data.answers import Extraction, is_correct
from octomed_data.prompts import JUDGE_RUBRIC_VERSION
from octomed_data.schema import TaskType
from octomed_data.teachers import TeacherConfig
from octomed_data.verify.calibration import Calibration
from octomed_data.verify.judge import JudgeJob, judge_key
from octomed_data.verify.match import SYNONYMS_VERSION, Matcher, equivalent

__all__ = [
    "Calibration",
    "JUDGE_UNPARSED",
    "JudgeJob",
    "Outcome",
    "SourceVerify",
    "Verifier",
    "VerifySettings",
    "equivalent",
    "is_open",
]

Mode = Literal["exact", "normalized", "judge"]
JUDGE_UNPARSED = "judge_unparsed"  # reject reason: the judge's reply stated no verdict
_OPEN = (TaskType.OPEN_QA, TaskType.OPEN_VQA)


def is_open(task_type: str | TaskType) -> bool:
    """Open-ended task types: the ones the verifier's mode applies to."""
    return TaskType(task_type) in _OPEN


class SourceVerify(BaseModel):
    """One source's verifier: its mode (None: the default) and whether to calibrate the judge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode | None = None
    calibrate: bool | None = None  # None: calibrate when the mode is judge


class VerifySettings(BaseModel):
    """The recipe's ``verify:`` block (also the filter stage's); its :meth:`fingerprint` re-judges on change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Mode = "exact"
    sources: dict[str, SourceVerify] = Field(default_factory=dict)  # keyed by the rows' ``source``
    judge: str | None = None  # a teacher from ``teachers:``; None: the first teacher
    synonyms: list[list[str]] = Field(default_factory=list)  # groups added to the built-in table
    calibration_samples: int = Field(100, ge=0)  # closed replies judged per source per shard
    max_attempts: int = Field(6, gt=0)

    @field_validator("sources", mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        # ``pathvqa: judge`` is short for ``pathvqa: {mode: judge}``.
        if isinstance(v, Mapping):
            return {k: {"mode": m} if isinstance(m, str) else m for k, m in v.items()}
        return v

    @field_validator("synonyms")
    @classmethod
    def _groups(cls, v: list[list[str]]) -> list[list[str]]:
        for group in v:
            if len([p for p in group if str(p).strip()]) < 2:
                raise ValueError(f"a synonym group needs at least two phrases, got {group}")
        return v

    def mode_for(self, source: str) -> str:
        entry = self.sources.get(source)
        return (entry.mode if entry is not None else None) or self.default

    def calibrates(self, source: str) -> bool:
        entry = self.sources.get(source)
        if entry is not None and entry.calibrate is not None:
            return entry.calibrate
        return self.mode_for(source) == "judge"

    @property
    def needs_judge(self) -> bool:
        """Does any source use the judge (to verify or to calibrate)?"""
        names = [None, *self.sources]
        return any(
            (self.default == "judge" if n is None else self.mode_for(n) == "judge" or self.calibrates(n))
            for n in names
        )

    def fingerprint(self, judge: TeacherConfig | None = None) -> str:
        """What the verdicts depend on: these settings, the synonym table and rubric versions, the judge."""
        parts: dict[str, Any] = {"settings": self.model_dump(mode="json"), "synonyms": SYNONYMS_VERSION}
        if self.needs_judge:
            parts["judge"] = [JUDGE_RUBRIC_VERSION, judge.model, judge.params_hash()] if judge else None
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Outcome:
    """A verified answer: correct or not, which verifier decided, why it matched, the judge's verdict."""

    correct: bool
    method: str  # exact | normalized | judge
    # a match's rule (exact | numeric | plural | spelling | synonym | abbreviation | word_order |
    # sentence | negation; see verify.match), judge, or None
    rule: str | None = None
    judge_correct: bool | None = None  # the judge's verdict when it was asked (incl. calibration)
    reason: str | None = None  # reject reason when not correct


class Verifier:
    """The verifier of one filter shard: settings, the judge and the judgements journalled so far.

    ``judgements`` maps :func:`~octomed_data.verify.judge.judge_key` -> journal record (verdict,
    status); ``calibration`` is the set of closed replies' keys chosen for calibration.
    """

    def __init__(
        self,
        settings: VerifySettings | None = None,
        judge: TeacherConfig | None = None,
        judgements: Mapping[str, Mapping[str, Any]] | None = None,
        calibration: set[str] | None = None,
    ) -> None:
        self.settings = settings or VerifySettings()
        self.judge = judge
        self.judgements = judgements or {}
        self.calibration = calibration or set()
        self.matcher = Matcher(self.settings.synonyms)
        self._picked: dict[str, list[tuple[int, str, JudgeJob]]] = {}

    def key(self, row: Mapping[str, Any]) -> str:
        assert self.judge is not None, "no judge configured"
        return judge_key(row, self.judge)

    def _match(self, row: Mapping[str, Any], ex: Extraction) -> str | None:
        return self.matcher.equivalent(row["gold_answer"], ex.text or ex.answer)

    def decide(self, row: Mapping[str, Any], ex: Extraction) -> Outcome:
        """The verdict on one reply whose answer was extracted (``ex.answer`` is not None)."""
        task = TaskType(row["task_type"])
        mode = self.settings.mode_for(row["source"])
        if not is_open(task) or mode == "exact":
            ok = is_correct(ex.answer, row["gold_answer"], task)
            judged = None
            if not is_open(task) and self.judge is not None and self.calibration:
                key = self.key(row)
                record = self.judgements.get(key) if key in self.calibration else None
                judged = record.get("verdict") if record is not None else None
            return Outcome(ok, "exact", "exact" if ok else None, judged, None if ok else "wrong_answer")
        rule = self._match(row, ex)
        if rule is not None or mode == "normalized":
            return Outcome(rule is not None, "normalized", rule, None, None if rule else "wrong_answer")
        record = self.judgements.get(self.key(row))
        if record is None:  # filter_shard judges every such reply first; a gap is a bug, not a verdict
            raise KeyError(f"no judgement for {self.key(row)}")
        verdict = record.get("verdict")
        if verdict is None:
            return Outcome(False, "judge", None, None, JUDGE_UNPARSED)
        return Outcome(bool(verdict), "judge", "judge", bool(verdict), None if verdict else "wrong_answer")

    def open_job(self, row: Mapping[str, Any], ex: Extraction, question: str) -> JudgeJob | None:
        """The judge request an open-ended reply needs (None: decided without the judge)."""
        if not is_open(row["task_type"]) or self.settings.mode_for(row["source"]) != "judge":
            return None
        if self._match(row, ex) is not None:
            return None
        return JudgeJob(
            self.key(row),
            row["question_id"],
            int(row["sample_idx"]),
            row["source"],
            "open",
            question,
            row["gold_answer"],
            ex.text or ex.answer or "",
        )

    def offer_calibration(
        self, row: Mapping[str, Any], ex: Extraction, question: str, options: list[tuple[str, str]]
    ) -> None:
        """Consider a closed reply for calibration: the N with the smallest key hash per source are kept."""
        n = self.settings.calibration_samples
        if is_open(row["task_type"]) or not n or not self.settings.calibrates(row["source"]):
            return
        key = self.key(row)
        rank = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
        texts = dict(options)

        def shown(answer: str) -> str:
            return f"{answer}. {texts[answer]}" if answer in texts else answer

        job = JudgeJob(
            key,
            row["question_id"],
            int(row["sample_idx"]),
            row["source"],
            "calibration",
            question,
            shown(row["gold_answer"]),
            shown(ex.answer or ""),
        )
        heap = self._picked.setdefault(row["source"], [])
        item = (-rank, key, job)  # a max-heap of the N smallest ranks: bounded memory
        if len(heap) < n:
            heapq.heappush(heap, item)
        elif -heap[0][0] > rank:
            heapq.heapreplace(heap, item)

    def calibration_jobs(self) -> list[JudgeJob]:
        """The chosen calibration replies (recorded in :attr:`calibration`), in a stable order."""
        jobs = sorted((job for heap in self._picked.values() for _, _, job in heap), key=lambda j: j.key)
        self.calibration = {j.key for j in jobs}
        return jobs
