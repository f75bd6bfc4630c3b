"""Rejection sampling, the filter stage: a verdict per teacher reply, accepted traces, statistics.

For each committed shard of ``distill/raw`` (every teacher reply, no verdict), :func:`filter_shard`
reads the question's options, extracts the final answer with :mod:`octomed_data.answers` (the one
answer-extraction module, also used by evaluation) and writes two shards of the same name:

* ``verdicts`` (:data:`~octomed_data.schema.VERDICT_SCHEMA`): one row per sample, the verdict and
  the reasoning length, no reply text; the statistics pass and the report read only this;
* ``accepted`` (:data:`~octomed_data.schema.ACCEPTED_SCHEMA`): the samples whose answer equals the
  gold answer, with their replies, verdicts and the verifier's provenance (``verifier``,
  ``verifier_rule``, ``judge_correct``); mixture, export and release read this.

``accepted`` is committed first and ``verdicts`` last: the verdicts marker is the shard's
done-signal. Because verdicts are made here and not while distilling, a better extractor (or other
``verify:`` settings) can judge a run again without a single distillation request.

``filter/verify_history.jsonl`` (:func:`record_verify_history`) says which verify settings produced
which verdicts: a ``changed`` line each time a run's settings are replaced, and a ``judged`` line per
settings fingerprint once every shard was judged with it (settings, judge, when, counts).

Open-ended answers are verified per source by :mod:`octomed_data.verify` (exact, normalized, or
an LLM judge whose judgements are journalled first, in a pass over the shard before the verdicts
are written); every verdict records which verifier decided it.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from octomed_data import storage
from octomed_data.answers import Extraction, extract_answer, looks_like_refusal
from octomed_data.errors import StorageError
from octomed_data.release_safety import SECRET_IN_REPLY
from octomed_data.schema import (
    ACCEPTED_SCHEMA,
    QUESTION_SCHEMA,
    SAMPLE_SCHEMA,
    VERDICT_SCHEMA,
    TaskType,
    options_of,
)
from octomed_data.verify import Verifier, VerifySettings
from octomed_data.verify.judge import JudgeEndpoint, JudgeIncomplete, JudgeJob, ajudge, read_judgements

FAILED = "request_failed"  # reject_reason of a sample whose requests failed after all attempts
# Bump when the verdict rules change: committed verdict shards are then re-judged.
# 2: verdicts record their verifier (exact | normalized | judge) and the judge's verdict.
# 3: accepted rows carry that provenance too (ACCEPTED_SCHEMA), for mixture, export and release.
JUDGE_VERSION = "3"
_EXACT = Verifier()


def _read(row: Mapping[str, Any], options: list[tuple[str, str]]) -> tuple[str | None, Extraction | None]:
    """(reject reason decided before any answer check, the extraction when an answer was read)."""
    if row.get("reject_reason") == FAILED:
        return FAILED, None
    if row.get("reject_reason") == SECRET_IN_REPLY:  # scrubbed when stored: never accepted
        return SECRET_IN_REPLY, None
    finish = row.get("finish_reason")
    if finish == "length":
        return "truncated", None
    if row.get("refusal") or finish == "content_filter":
        return "refusal", None
    response = row.get("response")
    ex = extract_answer(response, TaskType(row["task_type"]), options)
    if ex.answer is None:
        return ("refusal" if looks_like_refusal(response) else (ex.reason or "no_answer")), ex
    return None, ex


def judge(
    row: Mapping[str, Any], options: list[tuple[str, str]], verifier: Verifier | None = None
) -> dict[str, Any]:
    """The verdict on one stored reply: extracted answer, method, correct, reject reason, verifier."""
    reason, ex = _read(row, options)
    out: dict[str, Any] = {
        "extracted_answer": ex.answer if ex is not None else None,
        "extraction_method": ex.method if ex is not None and reason != FAILED else None,
        "correct": False,
        "reject_reason": reason,
        "verifier": None,
        "verifier_rule": None,
        "judge_correct": None,
    }
    if reason is None and ex is not None:
        outcome = (verifier or _EXACT).decide(row, ex)
        out.update(
            correct=outcome.correct,
            reject_reason=outcome.reason,
            verifier=outcome.method,
            verifier_rule=outcome.rule,
            judge_correct=outcome.judge_correct,
        )
    return out


def question_info(questions_uri: str, shard: str) -> dict[str, tuple[list[tuple[str, str]], str]]:
    """question_id -> (its (label, text) options, its text), for one committed questions shard."""
    ds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    if not ds.is_committed(shard):
        raise StorageError(f"questions shard {shard!r} is not committed in {questions_uri}")
    out: dict[str, tuple[list[tuple[str, str]], str]] = {}
    for batch in ds.iter_batches(columns=["question_id", "options", "question"], shards=[shard]):
        for row in batch.to_pylist():
            out[row["question_id"]] = (options_of(row), row["question"])
    return out


def question_options(questions_uri: str, shard: str) -> dict[str, list[tuple[str, str]]]:
    """question_id -> its (label, text) options, for one committed questions shard."""
    return {k: v[0] for k, v in question_info(questions_uri, shard).items()}


def _judge_jobs(
    raw: storage.Dataset, shard: str, questions: Mapping[str, tuple[list, str]], verifier: Verifier
) -> Iterator[JudgeJob]:
    """Stream the shard: the open replies the judge must decide, then the calibration replies
    (chosen once the whole shard was seen), minus what the journal already holds."""
    done = verifier.judgements
    for batch in raw.iter_batches(batch_size=2048, shards=[shard]):
        for row in batch.to_pylist():
            options, question = questions.get(row["question_id"], ([], ""))
            reason, ex = _read(row, options)
            if reason is not None or ex is None:
                continue
            job = verifier.open_job(row, ex, question)
            if job is None:
                verifier.offer_calibration(row, ex, question, options)
            elif job.key not in done:
                yield job
    for job in verifier.calibration_jobs():
        if job.key not in done:
            yield job


def _run_judge(
    raw: storage.Dataset,
    shard: str,
    questions: Mapping[str, tuple[list, str]],
    settings: VerifySettings,
    endpoint: JudgeEndpoint,
) -> tuple[Verifier, dict[str, Any]]:
    """Judge what the shard needs (journalled); the verifier holding every judgement, and counts."""
    verifier = Verifier(settings, endpoint.teacher, read_judgements(endpoint.journal, shard))
    report = asyncio.run(ajudge(_judge_jobs(raw, shard, questions, verifier), endpoint, shard))
    if report.failed or report.aborted:
        raise JudgeIncomplete(
            f"shard {shard}: {report.failed} judge request(s) failed"
            + (f" ({report.aborted})" if report.aborted else "")
            + "; the journal keeps the judged ones: run the filter again"
        )
    verifier.judgements = read_judgements(endpoint.journal, shard)
    counts = {
        "judge_requests": report.requests,
        "judged_new": report.judged,
        "judge_prompt_tokens": report.prompt_tokens,
        "judge_completion_tokens": report.completion_tokens,
    }
    return verifier, counts


def filter_shard(
    raw_uri: str,
    questions_uri: str,
    shard: str,
    verdicts_uri: str,
    accepted_uri: str,
    extra: Mapping[str, Any] | None = None,
    *,
    verify: VerifySettings | None = None,
    judge_endpoint: JudgeEndpoint | None = None,
) -> dict[str, Any]:
    """Judge one raw shard into ``verdicts`` and ``accepted`` (streamed); returns its counts.

    With a judge (``verify`` names one and ``judge_endpoint`` is given), a first pass over the
    shard sends the judge what the journal lacks; a failure there raises
    :class:`~octomed_data.verify.judge.JudgeIncomplete` before anything is committed.
    """
    settings = verify or VerifySettings()
    questions = question_info(questions_uri, shard)
    raw = storage.Dataset(raw_uri, SAMPLE_SCHEMA)
    judge_counts: dict[str, Any] = {}
    if settings.needs_judge and judge_endpoint is not None:
        verifier, judge_counts = _run_judge(raw, shard, questions, settings, judge_endpoint)
    elif settings.needs_judge:
        raise ValueError("these verify settings use a judge: pass judge_endpoint")
    else:
        verifier = Verifier(settings)
    verdicts = storage.Dataset(verdicts_uri, VERDICT_SCHEMA).writer(shard)
    accepted = storage.Dataset(accepted_uri, ACCEPTED_SCHEMA).writer(shard)
    reasons: Counter[str] = Counter()
    methods: Counter[str] = Counter()
    samples = failed = n_accepted = 0
    for batch in raw.iter_batches(batch_size=2048, shards=[shard]):
        for row in batch.to_pylist():
            row.update(judge(row, questions.get(row["question_id"], ([], ""))[0], verifier))
            reasoning = row.get("reasoning") or ""
            row["reasoning_chars"] = len(reasoning)
            row["reasoning_words"] = len(reasoning.split())
            verdicts.add(row)
            if row["reject_reason"] == FAILED:
                failed += 1
                continue
            samples += 1
            if row["verifier"]:
                methods[row["verifier"]] += 1
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
        "verified_by": dict(sorted(methods.items())),
    } | judge_counts
    marker = dict(extra or {}) | {"counts": counts, "judge_version": JUDGE_VERSION}
    accepted.commit(marker)
    verdicts.commit(marker)
    return counts


# ---------------------------------------------------------------------------- verify history
def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_verify_history(uri: str) -> list[dict[str, Any]]:
    """Every line of a ``verify_history.jsonl`` (oldest first); empty when there is none yet."""
    if not storage.exists(uri):
        return []
    text = storage.read_bytes(uri).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def record_verify_history(uri: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Add one line to the history; returns what was written.

    A ``judged`` entry whose fingerprint equals the last line's (a filter pass that re-judged some
    shards with the same settings) replaces that line, keeping its ``applied_at`` and, as
    ``first_pass``, the counts of the pass that first applied the settings (its judge requests),
    and setting ``updated_at``: the history has one ``judged`` line per stretch of one settings
    fingerprint. Its counts describe the current verdicts (summed over the shard markers). The
    file is small (one line per change) and rewritten whole, so it works on object stores too.
    """
    lines = read_verify_history(uri)
    doc = dict(entry)
    last = lines[-1] if lines else None
    if (
        doc.get("event") == "judged"
        and last is not None
        and last.get("event") == "judged"
        and last.get("fingerprint") == doc.get("fingerprint")
    ):
        first = last.get("first_pass") or {
            k: last.get(k) for k in ("samples", "accepted", "judge_requests", "judged_new")
        }
        doc = doc | {"applied_at": last.get("applied_at"), "updated_at": now_iso(), "first_pass": first}
        lines[-1] = doc
    else:
        doc.setdefault("applied_at", now_iso())
        lines.append(doc)
    body = "".join(json.dumps(line, sort_keys=True, default=str) + "\n" for line in lines)
    storage.write_bytes(uri, body.encode("utf-8"))
    return doc
