"""Rejection sampling, the filter stage: a verdict per teacher reply, accepted traces, statistics.

For each committed shard of ``distill/raw`` (every teacher reply, no verdict), :func:`filter_shard`
reads the question's options, extracts the final answer with :mod:`octomed_data.answers` (the one
answer-extraction module, also used by evaluation) and writes two shards of the same name:

* ``verdicts`` (:data:`~octomed_data.schema.VERDICT_SCHEMA`): one row per sample, the verdict and
  the reasoning length, no reply text; the statistics pass and the report read only this;
* ``accepted`` (:data:`~octomed_data.schema.SAMPLE_SCHEMA`): the samples whose answer equals the
  gold answer, with their replies and verdicts; mixture and export read this.

``accepted`` is committed first and ``verdicts`` last: the verdicts marker is the shard's
done-signal. Because verdicts are made here and not while distilling, a better extractor can judge
a run again without a single teacher request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from octomed_data import storage
from octomed_data.answers import extract_answer, is_correct, looks_like_refusal
from octomed_data.errors import StorageError
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, VERDICT_SCHEMA, TaskType, options_of

FAILED = "request_failed"  # reject_reason of a sample whose requests failed after all attempts
JUDGE_VERSION = "1"  # bump when the verdict rules change: committed verdict shards are then re-judged


def judge(row: Mapping[str, Any], options: list[tuple[str, str]]) -> dict[str, Any]:
    """The verdict on one stored reply: extracted answer, method, correct, reject reason."""
    if row.get("reject_reason") == FAILED:
        return {
            "extracted_answer": None,
            "extraction_method": None,
            "correct": False,
            "reject_reason": FAILED,
        }
    finish = row.get("finish_reason")
    response = row.get("response")
    extracted = method = None
    if finish == "length":
        reason: str | None = "truncated"
    elif row.get("refusal") or finish == "content_filter":
        reason = "refusal"
    else:
        ex = extract_answer(response, TaskType(row["task_type"]), options)
        extracted, method = ex.answer, ex.method
        if ex.answer is None:
            reason = "refusal" if looks_like_refusal(response) else (ex.reason or "no_answer")
        elif is_correct(ex.answer, row["gold_answer"], row["task_type"]):
            reason = None
        else:
            reason = "wrong_answer"
    return {
        "extracted_answer": extracted,
        "extraction_method": method,
        "correct": reason is None,
        "reject_reason": reason,
    }


def question_options(questions_uri: str, shard: str) -> dict[str, list[tuple[str, str]]]:
    """question_id -> its (label, text) options, for one committed questions shard."""
    ds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    if not ds.is_committed(shard):
        raise StorageError(f"questions shard {shard!r} is not committed in {questions_uri}")
    out: dict[str, list[tuple[str, str]]] = {}
    for batch in ds.iter_batches(columns=["question_id", "options"], shards=[shard]):
        for row in batch.to_pylist():
            out[row["question_id"]] = options_of(row)
    return out


def filter_shard(
    raw_uri: str,
    questions_uri: str,
    shard: str,
    verdicts_uri: str,
    accepted_uri: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Judge one raw shard into ``verdicts`` and ``accepted`` (streamed); returns its counts."""
    options = question_options(questions_uri, shard)
    raw = storage.Dataset(raw_uri, SAMPLE_SCHEMA)
    verdicts = storage.Dataset(verdicts_uri, VERDICT_SCHEMA).writer(shard)
    accepted = storage.Dataset(accepted_uri, SAMPLE_SCHEMA).writer(shard)
    reasons: Counter[str] = Counter()
    samples = failed = n_accepted = 0
    for batch in raw.iter_batches(batch_size=2048, shards=[shard]):
        for row in batch.to_pylist():
            row.update(judge(row, options.get(row["question_id"], [])))
            reasoning = row.get("reasoning") or ""
            row["reasoning_chars"] = len(reasoning)
            row["reasoning_words"] = len(reasoning.split())
            verdicts.add(row)
            if row["reject_reason"] == FAILED:
                failed += 1
                continue
            samples += 1
            if row["correct"]:
                accepted.add(row)
                n_accepted += 1
            else:
                reasons[row["reject_reason"] or "unknown"] += 1
    counts = {
        "samples": samples,
        "accepted": n_accepted,
        "failed_requests": failed,
        "rejected": dict(sorted(reasons.items())),
    }
    marker = dict(extra or {}) | {"counts": counts, "judge_version": JUDGE_VERSION}
    accepted.commit(marker)
    verdicts.commit(marker)
    return counts
