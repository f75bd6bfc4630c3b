"""The gold-label audit (the paper's teacher error analysis): questions whose gold label looks wrong.

Rejection sampling trusts the gold answer. When most of a question's samples agree on one *other*
answer, the gold label may be the error, not the teacher; and a question no sample answers
correctly teaches nothing and may be mislabelled too. Per question, from the filter's verdicts:

* **answered** samples: an answer was extracted *and* verified (``correct``, or rejected as
  ``wrong_answer``). Failed requests, truncated / refused / unparsed replies and judge replies
  with no verdict (``judge_unparsed``) are not answers;
* the **majority answer**: answers grouped by the form the verdict compared (the extracted label
  for multiple choice and yes/no/maybe; for open-ended questions the normalised text, with
  answers that :mod:`octomed_data.verify.match` calls equivalent, e.g. "5 mm" and "0.5 cm",
  counted as one), its **share** of the answered samples;
* flag ``suspected_label_error``: at least ``min_samples`` answered samples, a majority answer
  with share >= ``agree_share`` that is *not* the gold (no sample giving it was accepted by the
  verifier, and for open answers the normalized matcher does not call it equivalent to the
  gold), and at most ``max_correct_share`` of the answered samples correct;
* flag ``never_correct``: at least one answered sample and none correct (and not flagged above:
  the flags are disjoint). Questions with no answered sample get no flag; the statistics count
  them apart (``all_requests_failed`` when every request failed, else ``none_answered``).

Open answers are grouped in the normalised form the verdict stored (``0.5 cm`` reads ``0 5 cm``), so
the matcher sees words, plurals and synonyms there, not every quantity; an answer the verifier
accepted for any sample (``0.5 cm`` for ``5 mm`` in ``normalized`` mode) is never "another answer".

The audit runs inside the filter's one statistics pass (:func:`octomed_data.stats.source_statistics`),
shard by shard: every sample of a question is in one verdicts shard (a raw shard is distilled from
one questions shard, and ingest quarantines a question id seen twice), so memory is one shard's
questions. Each verdicts shard gets an audit shard of the same name (:data:`AUDIT_SCHEMA`, under
``filter/audit``) whose marker records the settings' fingerprint and the verdicts commit it was
made from; :func:`flagged_questions` reads it back for the mixture (``exclude_audit_flags``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from octomed_data import storage
from octomed_data.answers import normalize_open
from octomed_data.errors import StorageError
from octomed_data.schema import SCHEMA_VERSION, TaskType
from octomed_data.verify.match import Matcher

# Bump when the audit's rules change (recorded in every audit shard's marker and in stats.json).
AUDIT_VERSION = "1"
SUSPECTED_LABEL_ERROR = "suspected_label_error"
NEVER_CORRECT = "never_correct"
FLAGS = (SUSPECTED_LABEL_ERROR, NEVER_CORRECT)
Flag = Literal["suspected_label_error", "never_correct"]
FAILED = "request_failed"  # the filter's reject reason of a failed request (not a sample)
WRONG = "wrong_answer"  # the verifier's reject reason of an answer that is not the gold

# One row per audited question (defined here, beside the only code that writes it).
AUDIT_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("gold_answer", pa.string(), nullable=False),
        pa.field("majority_answer", pa.string()),  # null when no sample was answered
        pa.field("majority_share", pa.float64()),  # of the answered samples
        pa.field("n_samples", pa.int32(), nullable=False),  # judged samples (failed requests excluded)
        pa.field("n_failed", pa.int32(), nullable=False),  # failed requests
        pa.field("n_answered", pa.int32(), nullable=False),
        pa.field("n_correct", pa.int32(), nullable=False),
        pa.field("flag", pa.string()),  # suspected_label_error | never_correct | null
    ],
    metadata={"octomed.schema": "audit", "octomed.schema_version": SCHEMA_VERSION},
)

# The verdict columns the audit reads.
AUDIT_COLUMNS = ("question_id", "source", "task_type", "gold_answer", "extracted_answer", "correct")
AUDIT_COLUMNS += ("reject_reason",)


class AuditSettings(BaseModel):
    """When a question is flagged; the defaults suit 16 samples per question (4 is the least)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_samples: int = Field(4, ge=1, description="Answered samples needed to suspect a label error.")
    agree_share: float = Field(
        0.75, gt=0.5, le=1.0, description="Share of the answered samples on one answer other than the gold."
    )
    max_correct_share: float = Field(
        0.25, ge=0.0, le=1.0, description="At most this share of the answered samples may be correct."
    )
    examples: int = Field(5, ge=0, description="Example questions per source and flag in stats.json.")

    def fingerprint(self) -> str:
        doc = {"version": AUDIT_VERSION, "settings": self.model_dump(mode="json", exclude={"examples"})}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _kind(task_type: str) -> str:
    task = TaskType(task_type)
    if task.is_multiple_choice:
        return "label"
    return "verdict" if task == TaskType.YES_NO_MAYBE else "open"


def _key(answer: str | None, kind: str) -> str | None:
    if answer is None:
        return None
    if kind == "label":
        key = answer.strip().upper()
    elif kind == "verdict":
        key = answer.strip().lower()
    else:
        key = normalize_open(answer)
    return key or None


@dataclass
class _Question:
    source: str
    task_type: str
    gold: str
    kind: str  # label | verdict | open
    n_samples: int = 0
    n_failed: int = 0
    n_correct: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    accepted: set[str] = field(default_factory=set)  # answer keys some sample got accepted with


class ShardAudit:
    """The audit of one verdicts shard: feed it every verdict row (:meth:`add`), then :meth:`rows`."""

    def __init__(self, settings: AuditSettings | None = None, matcher: Matcher | None = None) -> None:
        self.settings = settings or AuditSettings()
        self.matcher = matcher or Matcher()
        self.questions: dict[str, _Question] = {}

    def add(self, row: Mapping[str, Any]) -> None:
        """One verdict row (the :data:`AUDIT_COLUMNS` are read)."""
        self.add_batch(*([row.get(c)] for c in AUDIT_COLUMNS))

    def add_batch(
        self,
        question_ids: Sequence[str],
        sources: Sequence[str],
        task_types: Sequence[str],
        golds: Sequence[str],
        answers: Sequence[str | None],
        correct: Sequence[bool | None],
        reasons: Sequence[str | None],
    ) -> None:
        """Many verdicts, as columns (the statistics pass's fast path: one call per batch)."""
        questions = self.questions
        last_id, q = None, None
        for qid, src, task, gold, answer, ok, reason in zip(
            question_ids, sources, task_types, golds, answers, correct, reasons, strict=True
        ):
            if qid != last_id:  # a question's samples are usually next to each other
                q = questions.get(qid)
                if q is None:
                    q = questions[qid] = _Question(src, task, gold, _kind(task))
                last_id = qid
            assert q is not None
            if reason == FAILED:
                q.n_failed += 1
                continue
            q.n_samples += 1
            if not ok and reason != WRONG:
                continue  # no verified answer: unparsed, truncated, refused, judge_unparsed
            key = _key(answer, q.kind)
            if key is None:
                continue
            q.answers[key] += 1
            if ok:
                q.n_correct += 1
                q.accepted.add(key)

    def _clusters(self, q: _Question) -> list[tuple[int, str, set[str]]]:
        """(count, representative, keys) per answer; open answers the matcher calls equivalent merge."""
        ranked = sorted(q.answers.items(), key=lambda kv: (-kv[1], kv[0]))
        if q.kind != "open":
            return [(n, key, {key}) for key, n in ranked]
        clusters: list[list[Any]] = []
        for key, n in ranked:  # the most frequent form represents its cluster
            for c in clusters:
                if self.matcher.equivalent(c[1], key) is not None:
                    c[0] += n
                    c[2].add(key)
                    break
            else:
                clusters.append([n, key, {key}])
        return sorted(((c[0], c[1], c[2]) for c in clusters), key=lambda c: (-c[0], c[1]))

    def _is_gold(self, q: _Question, keys: set[str], representative: str) -> bool:
        """Does the verifier accept this answer? (a sample giving it was accepted, or it is the gold)."""
        if keys & q.accepted:
            return True
        if q.kind == "open":
            return self.matcher.equivalent(q.gold, representative) is not None
        return _key(q.gold, q.kind) in keys

    def audit(self, question_id: str) -> dict[str, Any]:
        """The audit row of one question (:data:`AUDIT_SCHEMA`)."""
        q = self.questions[question_id]
        s = self.settings
        answered = sum(q.answers.values())
        majority = share = flag = None
        if answered:
            count, majority, keys = self._clusters(q)[0]
            share = count / answered
            if (
                answered >= s.min_samples
                and share >= s.agree_share
                and q.n_correct <= s.max_correct_share * answered
                and not self._is_gold(q, keys, majority)
            ):
                flag = SUSPECTED_LABEL_ERROR
            elif q.n_correct == 0:
                flag = NEVER_CORRECT
        return {
            "question_id": question_id,
            "source": q.source,
            "task_type": q.task_type,
            "gold_answer": q.gold,
            "majority_answer": majority,
            "majority_share": round(share, 4) if share is not None else None,
            "n_samples": q.n_samples,
            "n_failed": q.n_failed,
            "n_answered": answered,
            "n_correct": q.n_correct,
            "flag": flag,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One audit row per question of the shard, by question id."""
        return [self.audit(qid) for qid in sorted(self.questions)]


@dataclass
class _SourceTally:
    questions: int = 0
    answered: int = 0  # questions with at least one answered sample
    flags: Counter[str] = field(default_factory=Counter)
    all_requests_failed: int = 0
    none_answered: int = 0  # samples came back but none was an answer
    examples: dict[str, list[tuple[_Neg, int, dict[str, Any]]]] = field(default_factory=dict)

    def add(self, row: Mapping[str, Any], keep: int) -> None:
        self.questions += 1
        if row["n_answered"]:
            self.answered += 1
        elif row["n_samples"] == 0 and row["n_failed"]:
            self.all_requests_failed += 1
        else:
            self.none_answered += 1
        flag = row["flag"]
        if flag is None:
            return
        self.flags[flag] += 1
        if keep <= 0:
            return
        heap = self.examples.setdefault(flag, [])  # the `keep` smallest question ids: deterministic
        example = {k: row[k] for k in ("question_id", "gold_answer", "majority_answer", "majority_share")}
        example |= {"n_answered": row["n_answered"], "n_correct": row["n_correct"]}
        item = (_Neg(row["question_id"]), -self.questions, example)  # unique: never compares dicts
        if len(heap) < keep:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)

    def merge(self, other: _SourceTally) -> None:
        self.questions += other.questions
        self.answered += other.answered
        self.flags.update(other.flags)
        self.all_requests_failed += other.all_requests_failed
        self.none_answered += other.none_answered

    def summary(self, with_examples: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "questions": self.questions,
            "questions_answered": self.answered,
            **{f: self.flags.get(f, 0) for f in FLAGS},
            "all_requests_failed": self.all_requests_failed,
            "none_answered": self.none_answered,
            "suspected_label_error_rate": round(self.flags[SUSPECTED_LABEL_ERROR] / self.answered, 4)
            if self.answered
            else None,
        }
        if with_examples:
            out["examples"] = {
                flag: [e for _, _, e in sorted(heap, key=lambda t: (t[0].value, -t[1]))]
                for flag, heap in sorted(self.examples.items())
            }
        return out


@dataclass(frozen=True)
class _Neg:
    """Reverses string order, so a heap of these keeps the smallest ids."""

    value: str

    def __lt__(self, other: _Neg) -> bool:
        return self.value > other.value

    def __gt__(self, other: _Neg) -> bool:
        return self.value < other.value


class AuditTally:
    """Counts per source over every shard's audit rows (and a few example questions per flag)."""

    def __init__(self, settings: AuditSettings | None = None) -> None:
        self.settings = settings or AuditSettings()
        self.sources: dict[str, _SourceTally] = {}

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.sources.setdefault(row["source"], _SourceTally()).add(row, self.settings.examples)

    def summary(self, dataset: str | None = None) -> dict[str, Any]:
        overall = _SourceTally()
        for t in self.sources.values():
            overall.merge(t)
        return {
            "version": AUDIT_VERSION,
            "fingerprint": self.settings.fingerprint(),
            "settings": self.settings.model_dump(mode="json"),
            "dataset": dataset,
            "sources": {src: t.summary() for src, t in sorted(self.sources.items())},
            "overall": overall.summary(with_examples=False),
        }


def marker_extra(settings: AuditSettings, verdicts_uri: str, verdicts_info: storage.ShardInfo | None) -> dict:
    """What an audit shard records: the rules it used and the verdicts commit it was made from."""
    return {
        "audit_version": AUDIT_VERSION,
        "audit_fingerprint": settings.fingerprint(),
        "verdicts": verdicts_uri,
        "verdicts_committed_at": verdicts_info.committed_at if verdicts_info is not None else None,
    }


def write_audit_shard(
    audit_uri: str, shard: str, rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any]
) -> bool:
    """Commit one audit shard unless the committed one was made by the same rules from the same
    verdicts commit (a re-run over a finished run rewrites nothing). Returns whether it wrote."""
    ds = storage.Dataset(audit_uri, AUDIT_SCHEMA)
    info = ds.shard_info(shard)
    if info is not None and all(info.extra.get(k) == v for k, v in extra.items()) and info.rows == len(rows):
        return False
    counts = Counter(r["flag"] for r in rows if r["flag"])
    ds.write_shard(shard, list(rows), dict(extra) | {"counts": dict(sorted(counts.items()))})
    return True


def audit_verdicts_shard(
    verdicts_uri: str, shard: str, settings: AuditSettings | None = None, matcher: Matcher | None = None
) -> list[dict[str, Any]]:
    """The audit rows of one committed verdicts shard (streamed in batches)."""
    audit = ShardAudit(settings, matcher)
    ds = storage.Dataset(verdicts_uri)
    for batch in ds.iter_batches(batch_size=4096, columns=list(AUDIT_COLUMNS), shards=[shard]):
        audit.add_batch(*(batch.column(c).to_pylist() for c in AUDIT_COLUMNS))
    return audit.rows()


def flagged_questions(audit_uri: str, shard: str, flags: Iterable[str]) -> dict[str, str]:
    """question_id -> flag for the questions of one audit shard carrying one of ``flags``.

    The shard must exist and be as new as the verdicts it was made from (its marker records
    them): otherwise this raises a one-line :class:`StorageError` saying to run the filter again.
    """
    wanted = set(flags)
    ds = storage.Dataset(audit_uri, AUDIT_SCHEMA)
    info = ds.shard_info(shard)
    if info is None:
        raise StorageError(
            f"no gold-label audit for shard {shard} at {audit_uri}: run the filter stage again "
            "(its statistics pass writes the audit)"
        )
    verdicts = info.extra.get("verdicts")
    current = storage.Dataset(verdicts).shard_info(shard) if verdicts else None
    if current is None or current.committed_at != info.extra.get("verdicts_committed_at"):
        raise StorageError(
            f"the gold-label audit of shard {shard} ({audit_uri}) is older than its verdicts: "
            "run the filter stage again (its statistics pass rewrites the audit)"
        )
    out: dict[str, str] = {}
    for batch in ds.iter_batches(columns=["question_id", "flag"], shards=[shard]):
        for qid, flag in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            if flag in wanted:
                out[qid] = flag
    return out
