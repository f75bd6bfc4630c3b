"""The one statistics pass of rejection sampling, streamed from the verdicts shard by shard.

``stats.json`` and the run report both read what :func:`source_statistics` returns, so they never
disagree. The rule for failed requests (teacher errors after every retry) is one: they are not
samples; they are counted as ``failed_requests`` and left out of pass rates.


Per source: samples, accepted, pass rate, pass@N (questions with at least one accepted trace),
questions with no accepted trace, reject reasons, and the reasoning-length distribution (chars;
percentiles from a fixed-size reservoir so memory does not grow with the run). A source whose
rejection rate is below 30% is flagged ``too_easy`` (the paper's sign of a too-easy source or an
overconfident teacher). Memory: one shard's question counters at a time.

``verifier``: per source, how many verdicts each verifier made (exact, normalized, judge), and the
LLM judge's calibration on closed replies (precision / recall / agreement / kappa against exact
match, :mod:`octomed_data.verify.calibration`), per source and overall.

``audit``: the gold-label audit (:mod:`octomed_data.audit`), made in the same pass, shard by shard
(a question's samples are all in one verdicts shard): per source, questions whose samples mostly
agree on another answer than the gold (``suspected_label_error``), questions no answered sample
got right (``never_correct``), a few example question ids; and one audit row per question written
to ``filter/audit`` (beside the verdicts, or ``audit_uri``). Every pass recomputes the statistics
from the verdicts and rewrites only audit shards whose verdicts or rules changed, so re-running
over a finished run counts nothing twice; audit shards of vanished verdicts shards are dropped.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from octomed_data import storage
from octomed_data.audit import (
    AUDIT_COLUMNS,
    AuditSettings,
    AuditTally,
    ShardAudit,
    marker_extra,
    write_audit_shard,
)
from octomed_data.layout import FilterFolder
from octomed_data.schema import QUESTION_SCHEMA, VERDICT_SCHEMA
from octomed_data.verify import VerifySettings, is_open
from octomed_data.verify.calibration import Calibration
from octomed_data.verify.match import Matcher

TOO_EASY_REJECTION_RATE = 0.30
FAILED = "request_failed"
_RESERVOIR = 10_000


@dataclass
class _Lengths:
    """Reservoir of lengths (bounded memory) plus exact count / mean / max."""

    n: int = 0
    total: int = 0
    max: int = 0
    sample: list[int] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, value: int) -> None:
        self.n += 1
        self.total += value
        self.max = max(self.max, value)
        if len(self.sample) < _RESERVOIR:
            self.sample.append(value)
        else:
            j = self.rng.randrange(self.n)
            if j < _RESERVOIR:
                self.sample[j] = value

    def summary(self) -> dict[str, Any]:
        if not self.n:
            return {"count": 0}
        s = sorted(self.sample)

        def pct(p: float) -> int:
            return s[min(len(s) - 1, int(p * len(s)))]

        return {
            "count": self.n,
            "mean": round(self.total / self.n, 1),
            "p10": pct(0.10),
            "p25": pct(0.25),
            "p50": pct(0.50),
            "p75": pct(0.75),
            "p90": pct(0.90),
            "max": self.max,
        }


@dataclass
class _Source:
    samples: int = 0
    accepted: int = 0
    failed: int = 0
    questions: int = 0
    questions_with_accepted: int = 0
    questions_not_distilled: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    reasoning_all: _Lengths = field(default_factory=_Lengths)
    reasoning_accepted: _Lengths = field(default_factory=_Lengths)

    def summary(self, samples_per_question: int | None) -> dict[str, Any]:
        pass_rate = self.accepted / self.samples if self.samples else None
        rejection = 1.0 - pass_rate if pass_rate is not None else None
        return {
            "samples": self.samples,
            "accepted": self.accepted,
            "failed_requests": self.failed,
            "pass_rate": round(pass_rate, 4) if pass_rate is not None else None,
            "rejection_rate": round(rejection, 4) if rejection is not None else None,
            "questions": self.questions,
            "questions_with_accepted": self.questions_with_accepted,
            "questions_without_accepted": self.questions - self.questions_with_accepted,
            "questions_not_distilled": self.questions_not_distilled,
            f"pass@{samples_per_question or 'N'}": round(self.questions_with_accepted / self.questions, 4)
            if self.questions
            else None,
            "reject_reasons": dict(sorted(self.rejected.items())),
            "reasoning_chars": self.reasoning_all.summary(),
            "reasoning_chars_accepted": self.reasoning_accepted.summary(),
            "too_easy": bool(rejection is not None and rejection < TOO_EASY_REJECTION_RATE),
        }


def audit_uri_for(verdicts: str) -> str:
    """The audit dataset beside a verdicts dataset (``filter/verdicts`` -> ``filter/audit``)."""
    parent = verdicts.rstrip("/").rsplit("/", 1)[0] if "/" in verdicts.rstrip("/") else "."
    return FilterFolder(parent).audit


def source_statistics(
    verdicts: str,
    questions_uri: str | None = None,
    samples_per_question: int | None = None,
    *,
    audit: AuditSettings | None = None,
    audit_uri: str | None = None,
    verify: VerifySettings | None = None,
) -> dict[str, Any]:
    """Statistics per source (and overall), per task type and per teacher, of a verdicts dataset.

    The gold-label audit (``audit`` settings, default :class:`AuditSettings`) is written to
    ``audit_uri`` (default: ``audit`` beside ``verdicts``); ``verify`` gives the user's synonym
    groups the audit uses to group open-ended answers (as the verifier did).
    """
    audit_settings = audit or AuditSettings()
    audit_uri = audit_uri or audit_uri_for(verdicts)
    matcher = Matcher(verify.synonyms if verify is not None else ())
    tally = AuditTally(audit_settings)
    sources: dict[str, _Source] = defaultdict(_Source)
    total = _Source()
    tasks: dict[str, _Lengths] = defaultdict(_Lengths)  # words of accepted reasoning, per task type
    teachers: Counter[str] = Counter()
    methods: dict[str, Counter[str]] = defaultdict(Counter)
    calibration: dict[str, Calibration] = defaultdict(Calibration)
    ds = storage.Dataset(verdicts, VERDICT_SCHEMA)
    cols = ["question_id", "source", "correct", "reject_reason", "reasoning_chars", "reasoning_words"]
    cols += ["task_type", "teacher", "verifier", "judge_correct", "extracted_answer", "gold_answer"]
    raw_shards = ds.committed(lambda info: dataclasses.replace(info, extra={}))  # not every marker's extra
    for shard, info in raw_shards.items():
        per_q: dict[str, list[Any]] = {}  # question_id -> [source, n, correct]
        shard_audit = ShardAudit(audit_settings, matcher)
        for batch in ds.iter_batches(batch_size=4096, columns=cols, shards=[shard]):
            values = {c: batch.column(c).to_pylist() for c in cols}
            shard_audit.add_batch(*(values[c] for c in AUDIT_COLUMNS))
            for qid, src, ok, reason, length, words, task, teacher, method, judged in zip(
                *(values[c] for c in cols[:10]), strict=True
            ):
                s = sources[src]
                if reason == FAILED:  # not a sample: a question whose every request failed is "not distilled"
                    s.failed += 1
                    total.failed += 1
                    continue
                entry = per_q.setdefault(qid, [src, 0, 0])
                entry[1] += 1
                teachers[teacher] += 1
                if method:
                    methods[src][method] += 1
                if judged is not None and not is_open(task):  # a calibration reply
                    calibration[src].add(bool(ok), bool(judged))
                if ok:
                    tasks[task].add(words)
                for agg in (s, total):
                    agg.samples += 1
                    agg.reasoning_all.add(length)
                    if ok:
                        agg.accepted += 1
                        agg.reasoning_accepted.add(length)
                    else:
                        agg.rejected[reason or "unknown"] += 1
                if ok:
                    entry[2] += 1
        for src, _n, n_ok in per_q.values():
            for agg in (sources[src], total):
                agg.questions += 1
                agg.questions_with_accepted += 1 if n_ok else 0
        audit_rows = shard_audit.rows()
        tally.add(audit_rows)
        write_audit_shard(audit_uri, shard, audit_rows, marker_extra(audit_settings, verdicts, info))
        if questions_uri:
            _count_not_distilled(questions_uri, shard, set(per_q), sources, total)
    if questions_uri:
        qds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
        for shard in qds.committed_names():
            if shard not in raw_shards:
                _count_not_distilled(questions_uri, shard, set(), sources, total)
    storage.Dataset(audit_uri).drop_stale(list(raw_shards))  # audits of verdicts shards now gone
    return {
        "samples_per_question": samples_per_question,
        "too_easy_rejection_rate": TOO_EASY_REJECTION_RATE,
        "sources": {k: v.summary(samples_per_question) for k, v in sorted(sources.items())},
        "overall": total.summary(samples_per_question),
        # Words of accepted reasoning per task type: summary plus a bounded sample for box plots.
        "reasoning_words_by_task": {
            k: v.summary() | {"sample": sorted(v.sample)[:: max(1, len(v.sample) // 2000)]}
            for k, v in sorted(tasks.items())
        },
        "teachers": dict(sorted(teachers.items())),
        "verifier": _verifier_section(methods, calibration),
        "audit": tally.summary(audit_uri),
    }


def _verifier_section(
    methods: dict[str, Counter[str]], calibration: dict[str, Calibration]
) -> dict[str, Any]:
    overall = Calibration()
    for c in calibration.values():
        overall.merge(c)
    cal = {src: c.summary() for src, c in sorted(calibration.items())}
    if calibration:
        cal["overall"] = overall.summary()
    return {
        "verified_by": {src: dict(sorted(m.items())) for src, m in sorted(methods.items())},
        "calibration": cal,
    }


def _count_not_distilled(
    questions_uri: str, shard: str, seen: set[str], sources: dict[str, _Source], total: _Source
) -> None:
    qds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    if not qds.is_committed(shard):
        return
    for batch in qds.iter_batches(columns=["question_id", "source"], shards=[shard]):
        for qid, src in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            if qid not in seen:
                sources[src].questions_not_distilled += 1
                total.questions_not_distilled += 1
