"""The optional difficulty filter (off by default, as in the paper's final recipe): grading.

A grader model (any OpenAI-compatible endpoint) rates each question's difficulty on a fixed 1-10
scale; the filter keeps those scored within ``[low, high]``. The requests go through the request
processor (:class:`~octomed_data.inference.processor.RequestProcessor`: rate limit, retries,
breaker, journal), so scores are durable per question and a re-run asks only for what is not
stored yet. A reply without one clear integer score is recorded as ``unscored`` (never guessed)
and not kept. :func:`agrade_shard` grades one questions shard and writes its kept questions (same
shard name) and its scores; the shard loop is the stage's
(:class:`~octomed_data.stages.difficulty.DifficultyStage`, run by ``run_stage``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.answers import looks_like_refusal
from octomed_data.errors import ConfigError
from octomed_data.inference.client import EndpointClient, sample_seed
from octomed_data.inference.journal import FAILED, iter_journal
from octomed_data.inference.processor import RequestProcessor, request_kwargs
from octomed_data.inference.ratelimit import RateLimiter
from octomed_data.inference.replies import read_choice
from octomed_data.inference.retry import Backoff
from octomed_data.layout import DifficultyFolder
from octomed_data.prompts import build_messages
from octomed_data.schema import QUESTION_SCHEMA, SCORE_SCHEMA
from octomed_data.teachers import SIMULATED_LABEL, TeacherConfig, simulated_reply

GRADING_VERSION = "difficulty-v1"  # part of every score's key: change the prompt -> bump this
SCALE = (1, 10)
GRADING_SYSTEM_PROMPT = (
    "You are an experienced medical educator. Rate the difficulty of the exam question below "
    "for a well-prepared final-year medical student on a scale from 1 to 10, where 1 means "
    "simple recall and 10 means expert-level multi-step reasoning. Do not answer the question. "
    "Give the main reason in one short sentence, then end your reply with exactly one line of "
    "the form 'Difficulty: N' where N is an integer from 1 to 10."
)
SCORED, UNSCORED = "scored", "unscored"


# One statement line: "Difficulty: 7", "**Difficulty:** 7/10", "Difficulty = 7." (whole line).
_SCORE_LINE = re.compile(
    r"^[ \t>*_#-]*difficulty[ \t*_]*[:=][ \t*_]*(.*?)[ \t*_.]*$", re.IGNORECASE | re.MULTILINE
)
_SCORE_VALUE = re.compile(r"^(\d{1,3})(?:\s*/\s*10)?$")


@dataclass(frozen=True)
class Grade:
    """A parsed grading reply: ``score`` or the ``reason`` there is none."""

    score: int | None
    reason: str | None = None


def parse_difficulty(text: str | None) -> Grade:
    """Read the ``Difficulty: N`` line(s) of a grading reply, strictly.

    No such line -> ``no_score``; a value that is not an integer -> ``not_an_integer``;
    lines that disagree -> ``ambiguous``; outside 1..10 -> ``out_of_range``. Never guessed.
    """
    values = [m.group(1).strip() for m in _SCORE_LINE.finditer(text or "")]
    if not values:
        return Grade(None, "no_score")
    scores = set()
    for v in values:
        m = _SCORE_VALUE.match(v)
        if m is None:
            return Grade(None, "not_an_integer")
        scores.add(int(m.group(1)))
    if len(scores) > 1:
        return Grade(None, "ambiguous")
    score = scores.pop()
    if not SCALE[0] <= score <= SCALE[1]:
        return Grade(None, "out_of_range")
    return Grade(score)


def grading_messages(question: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The grading request: the fixed grading system prompt + the question's usual user turn
    (text and options, images as data URLs), so the grader sees what the teacher would."""
    user = build_messages(question)[1]
    return [{"role": "system", "content": GRADING_SYSTEM_PROMPT}, user]


def difficulty_uri(out: str) -> str:
    """Where grading state lives: ``OUT/difficulty`` (journal, ``scores`` dataset, summary)."""
    return DifficultyFolder(out).work


def scores_uri(out: str) -> str:
    return DifficultyFolder(out).scores


def check_band(low: int, high: int) -> None:
    """A band is two integers ``1 <= low <= high <= 10`` (a ConfigError otherwise)."""
    if not (isinstance(low, int) and isinstance(high, int) and SCALE[0] <= low <= high <= SCALE[1]):
        raise ConfigError(
            f"difficulty band needs integers {SCALE[0]} <= low <= high <= {SCALE[1]}, got {low}..{high}"
        )


def _grade_of(response: Any) -> dict[str, Any]:
    """Status, score and texts of a successful grading response."""
    choice = response.choices[0]
    msg = choice.message
    reply = read_choice(choice)
    reasoning, text = reply.reasoning, reply.answer
    refusal = getattr(msg, "refusal", None)
    finish = choice.finish_reason
    if finish == "length":
        grade = Grade(None, "truncated")
    elif refusal or finish == "content_filter":
        grade = Grade(None, "refusal")
    else:
        grade = parse_difficulty(text)
        if grade.score is None and looks_like_refusal(text):
            grade = Grade(None, "refusal")
    return {
        "status": SCORED if grade.score is not None else UNSCORED,
        "score": grade.score,
        "reason": grade.reason,
        "response": text or refusal or None,
        "reasoning": reasoning,
        "finish_reason": finish,
    }


async def _grade_question(proc: RequestProcessor, tc: EndpointClient, q: Mapping[str, Any]) -> None:
    """One grading request for one question, journalled (as a score, unscored, or failure)."""
    teacher = tc.teacher
    if q.get("images"):
        messages = await asyncio.to_thread(grading_messages, q)
    else:
        messages = grading_messages(q)
    seed = sample_seed(0, q["question_id"], 0)  # the distillation config's default seed
    reply = await proc.request(tc, request_kwargs(tc, messages, seed, 1))
    rec: dict[str, Any] = {
        "question_id": q["question_id"],
        "source": q["source"],
        "task_type": q["task_type"],
        "sample_idx": 0,
        "teacher": teacher.name,
        "model": teacher.model,
        "prompt_version": GRADING_VERSION,
        "params_hash": tc.params_hash,
        "attempts": reply.attempts,
        "created_at": int(time.time() * 1000),
    }
    response = reply.response
    if response is None:
        rec.update(status=FAILED, reject_reason=FAILED, error=reply.error)
    else:
        rec.update(_grade_of(response), latency_s=round(reply.latency, 4))
        usage = getattr(response, "usage", None)
        if usage is not None:
            rec.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
            proc.counters.prompt_tokens += usage.prompt_tokens or 0
            proc.counters.completion_tokens += usage.completion_tokens or 0
        if simulated_reply(response):
            rec["teacher"] = SIMULATED_LABEL  # simulated scores are never passed off as a real grader's
    proc.add(rec)


def _stored_grades(work: str, shard: str, teacher: TeacherConfig) -> dict[str, tuple[str, int | None]]:
    """question_id -> (status, score) for every question this grader already answered (first answer wins)."""
    grades: dict[str, tuple[str, int | None]] = {}
    params = teacher.params_hash()
    for rec in iter_journal(work, shard):
        if rec.get("reject_reason") == FAILED or rec["question_id"] in grades:
            continue
        if (
            rec["model"] == teacher.model
            and rec["prompt_version"] == GRADING_VERSION
            and rec["params_hash"] == params
        ):
            grades[rec["question_id"]] = (rec["status"], rec.get("score"))
    return grades


def _score_rows(
    work: str, shard: str, teacher: TeacherConfig, qids: set[str], low: int, high: int
) -> Iterator[dict[str, Any]]:
    """Scores-dataset rows: one per question of the shard that has a record (failures last)."""
    params = teacher.params_hash()
    written: set[str] = set()
    failures: dict[str, dict[str, Any]] = {}
    for rec in iter_journal(work, shard):
        qid = rec["question_id"]
        if qid not in qids or qid in written:
            continue
        if (
            rec["model"] != teacher.model
            or rec["prompt_version"] != GRADING_VERSION
            or rec["params_hash"] != params
        ):
            continue
        if rec.get("reject_reason") == FAILED:
            failures[qid] = rec  # the latest failure of a question that (so far) has no answer
            continue
        written.add(qid)
        failures.pop(qid, None)
        yield _score_row(rec, low, high)
    for qid, rec in failures.items():
        if qid not in written:
            yield _score_row(rec, low, high)


def _score_row(rec: Mapping[str, Any], low: int, high: int) -> dict[str, Any]:
    score = rec.get("score")
    return {
        **rec,
        "grader": rec["teacher"],
        "grading_version": rec["prompt_version"],
        "kept": rec["status"] == SCORED and low <= score <= high,
        "created_at": rec.get("created_at"),  # epoch ms: the schema's timestamp[ms] takes it as is
    }


def _commit_shard(
    questions_uri: str,
    shard: str,
    out: str,
    filtered_uri: str,
    teacher: TeacherConfig,
    low: int,
    high: int,
    marker: dict[str, Any],
) -> dict[str, Any]:
    """Write the shard's scores (their marker: ``marker`` + counts per source, ``complete``) and,
    when every question has an answer, its kept questions; returns the counts per source."""
    work = difficulty_uri(out)
    grades = _stored_grades(work, shard, teacher)
    kept_rows: list[dict[str, Any]] = []
    qids: set[str] = set()
    per_source: dict[str, Counter[str]] = {}
    for q in storage.Dataset(questions_uri, QUESTION_SCHEMA).iter_rows(shards=[shard]):
        qids.add(q["question_id"])
        counts = per_source.setdefault(q["source"], Counter())
        status, score = grades.get(q["question_id"], (FAILED, None))
        if status == SCORED and low <= score <= high:
            kept_rows.append(q)
            counts["kept"] += 1
        elif status == SCORED:
            counts["dropped"] += 1
        elif status == UNSCORED:
            counts["unscored"] += 1
        else:
            counts["failed"] += 1
    missing = sum(c["failed"] for c in per_source.values())
    band = {"filter": f"difficulty[{low},{high}]", "grading_version": GRADING_VERSION, "model": teacher.model}
    dest = storage.Dataset(filtered_uri, QUESTION_SCHEMA)
    if missing:
        # An incomplete shard would silently be a different filter: withdraw it until re-run.
        if dest.is_committed(shard):
            dest.delete_shard(shard)
    else:
        dest.write_shard(shard, kept_rows, extra=band)
    sources = {s: {k: c[k] for k in ("kept", "dropped", "unscored", "failed")} for s, c in per_source.items()}
    scores = list(_score_rows(work, shard, teacher, qids, low, high))  # one row per question
    extra = band | marker | {"complete": not missing, "per_source": sources}
    storage.Dataset(scores_uri(out), SCORE_SCHEMA).write_shard(
        shard, scores, extra=extra
    )  # done-signal: last
    return sources


async def agrade_shard(
    questions_uri: str,
    shard: str,
    out: str,
    filtered_uri: str,
    *,
    teacher: TeacherConfig,
    key: SecretStr,
    low: int,
    high: int,
    limiter: RateLimiter | None = None,
    max_attempts: int = 6,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
    progress: Any = None,
    marker: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Grade every question of ``shard`` the journal (``OUT/difficulty``, keyed by question, grader
    model, :data:`GRADING_VERSION` and sampling params) has no answer for, then write the shard's
    scores (``OUT/difficulty/scores``, :data:`SCORE_SCHEMA`) and, when no request failed, its kept
    questions (``filtered_uri``). Returns the shard's report (also in its scores marker)."""
    check_band(low, high)
    work = difficulty_uri(out)
    done = await asyncio.to_thread(_stored_grades, work, shard, teacher)
    tc = await asyncio.to_thread(EndpointClient, teacher, key)  # server-kind probe: off the loop
    proc = RequestProcessor(
        {teacher.name: tc},
        limiter=limiter,
        max_attempts=max_attempts,
        backoff=Backoff(backoff_base_s, backoff_max_s),
        folder=work,
        shard=shard,
        progress=progress,
    ).start()
    stored_before = 0

    def works() -> Iterator[Any]:
        nonlocal stored_before
        qds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
        for batch in qds.iter_batches(batch_size=256, shards=[shard]):
            for q in batch.to_pylist():
                if q["question_id"] in done:
                    stored_before += 1
                    if progress is not None:
                        progress.update(1)
                elif not proc.abort:
                    yield _grade_question(proc, tc, q)

    try:
        await proc.fan_out(works(), proc.queue_limit())
    finally:
        await proc.close()
    c = proc.counters
    report = {
        "stored_before": stored_before,
        "new_scores": c.stored,
        "requests": c.requests,
        "retries": c.retries,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "aborted": proc.abort,
    }
    sources = await asyncio.to_thread(
        _commit_shard,
        questions_uri,
        shard,
        out,
        filtered_uri,
        teacher,
        low,
        high,
        {**(marker or {}), "report": report},
    )
    return report | {"per_source": sources}
