"""Optional question filters (off by default, as in the paper's final recipe).

The paper's ablations keep only questions of a chosen difficulty. Two filters, neither of which
the default pipeline calls:

* :func:`filter_by_pass_rate`: keep questions that a chosen model answered correctly between
  ``k`` and ``m`` times out of its N samples. Run ``distill`` with that model into some ``OUT``
  and the filter stage first; this reads its verdicts (``OUT/verdicts``).
* :func:`filter_by_difficulty`: ask a grader model (any OpenAI-compatible endpoint) to rate each
  question's difficulty on a fixed 1-10 scale and keep those scored within ``[low, high]``. The
  requests go through the inference client (:mod:`octomed_data.inference.client`) and the
  distillation engine's rate-limit and journal code, so
  scores are durable per question and a re-run asks only for what is not stored yet. A reply
  without one clear integer score is recorded as ``unscored`` (never guessed) and not kept.

Both write the kept questions as a new questions dataset (same shard names), one shard at a time.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.answers import looks_like_refusal
from octomed_data.distill.engine import ShardRun, shard_names
from octomed_data.distill.journal import FAILED, iter_journal
from octomed_data.errors import ConfigError, StorageError
from octomed_data.inference.client import EndpointClient, sample_seed
from octomed_data.inference.ratelimit import LocalRateLimiter, RateLimiter
from octomed_data.inference.replies import read_choice
from octomed_data.prompts import build_messages
from octomed_data.sandbox import SANDBOX_FINGERPRINT, SANDBOX_TEACHER
from octomed_data.schema import (
    QUESTION_SCHEMA,
    SCORE_SCHEMA,
    VERDICT_SCHEMA,
)
from octomed_data.teachers import DistillConfig, TeacherConfig, resolve_api_key


def _correct_counts(verdicts_uri: str, shard: str, teacher: str | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    ds = storage.Dataset(verdicts_uri, VERDICT_SCHEMA)
    if not ds.is_committed(shard):
        return counts
    cols = ["question_id", "teacher", "correct", "reject_reason"]
    for batch in ds.iter_batches(columns=cols, shards=[shard]):
        for qid, t, ok, reason in zip(*(batch.column(c).to_pylist() for c in cols), strict=True):
            if reason == FAILED or (teacher is not None and t != teacher):
                continue
            counts[qid] = counts.get(qid, 0) + (1 if ok else 0)
    return counts


def filter_by_pass_rate(
    questions_uri: str, verdicts_uri: str, filtered_uri: str, k: int, m: int, *, teacher: str | None = None
) -> dict[str, Any]:
    """Keep questions whose correct-sample count in the filter stage's verdicts lies in ``[k, m]``.

    Questions with no verdicts are dropped and counted as ``not_sampled``.
    """
    if not 0 <= k <= m:
        raise ConfigError(f"pass-rate band needs 0 <= k <= m, got k={k}, m={m}")
    qds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    dest = storage.Dataset(filtered_uri, QUESTION_SCHEMA)
    kept = dropped = not_sampled = 0
    for shard in qds.manifest():
        counts = _correct_counts(verdicts_uri, shard, teacher)
        rows = []
        for row in qds.iter_rows(shards=[shard]):
            c = counts.get(row["question_id"])
            if c is None:
                not_sampled += 1
            elif k <= c <= m:
                rows.append(row)
            else:
                dropped += 1
        kept += len(rows)
        dest.write_shard(shard, rows, extra={"filter": f"pass_rate[{k},{m}]", "teacher": teacher})
    return {"kept": kept, "dropped": dropped, "not_sampled": not_sampled, "uri": filtered_uri}


# --- LLM difficulty score band ---------------------------------------------------------------

GRADING_VERSION = "difficulty-v1"  # part of every score's key: change the prompt -> bump this
SCALE = (1, 10)
GRADING_SYSTEM_PROMPT = (
    "You are an experienced medical educator. Rate the difficulty of the exam question below "
    "for a well-prepared final-year medical student on a scale from 1 to 10, where 1 means "
    "simple recall and 10 means expert-level multi-step reasoning. Do not answer the question. "
    "Give the main reason in one short sentence, then end your reply with exactly one line of "
    "the form 'Difficulty: N' where N is an integer from 1 to 10."
)
DIFFICULTY_DIR = "difficulty"
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
    return storage.join(out, DIFFICULTY_DIR)


def scores_uri(out: str) -> str:
    return storage.join(out, DIFFICULTY_DIR, "scores")


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


async def _grade_question(run: ShardRun, tc: EndpointClient, q: Mapping[str, Any]) -> None:
    """One grading request for one question, journalled (as a score, unscored, or failure)."""
    teacher = tc.teacher
    if q.get("images"):
        messages = await asyncio.to_thread(grading_messages, q)
    else:
        messages = grading_messages(q)
    chars = sum(len(str(m["content"])) for m in messages)
    async with tc.slots:
        response, attempts, latency, error = await run.request(
            tc, messages, sample_seed(run.config.seed, q["question_id"], 0), 1, chars
        )
    rec: dict[str, Any] = {
        "question_id": q["question_id"],
        "source": q["source"],
        "task_type": q["task_type"],
        "sample_idx": 0,
        "teacher": teacher.name,
        "model": teacher.model,
        "prompt_version": GRADING_VERSION,
        "params_hash": tc.params_hash,
        "attempts": attempts,
        "created_at": int(time.time() * 1000),
    }
    if response is None:
        rec.update(status=FAILED, reject_reason=FAILED, error=error)
    else:
        rec.update(_grade_of(response), latency_s=round(latency, 4))
        usage = getattr(response, "usage", None)
        if usage is not None:
            rec.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
            run.counters.prompt_tokens += usage.prompt_tokens or 0
            run.counters.completion_tokens += usage.completion_tokens or 0
        if getattr(response, "system_fingerprint", None) == SANDBOX_FINGERPRINT:
            rec["teacher"] = SANDBOX_TEACHER  # sandbox scores are never passed off as a real grader's
    run.journal.add(rec)


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


def _raise_first_error(finished: set[asyncio.Task[None]]) -> None:
    for task in finished:
        task.result()  # re-raises a grading task's exception


async def _grade_shard(
    questions_uri: str, shard: str, work: str, run: ShardRun, tc: EndpointClient, summary: dict[str, Any]
) -> None:
    """Send a grading request for every question of ``shard`` the journal has no answer for."""
    done = await asyncio.to_thread(_stored_grades, work, shard, tc.teacher)
    qds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    tasks: set[asyncio.Task[None]] = set()
    limit = 2 * tc.teacher.max_in_flight + 16  # a small queue beyond the in-flight bound, no more
    run.journal.start()
    try:
        for batch in qds.iter_batches(batch_size=256, shards=[shard]):
            for q in batch.to_pylist():
                if q["question_id"] in done:
                    summary["stored_before"] += 1
                    if run.progress is not None:
                        run.progress.update(1)
                    continue
                if run.abort:
                    continue
                while len(tasks) >= limit:
                    finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    _raise_first_error(finished)
                tasks.add(asyncio.create_task(_grade_question(run, tc, q)))
        if tasks:
            finished, tasks = await asyncio.wait(tasks)
            _raise_first_error(finished)
    finally:
        for task in tasks:
            task.cancel()
        await run.journal.close()


def _commit_shard(
    questions_uri: str,
    shard: str,
    out: str,
    filtered_uri: str,
    teacher: TeacherConfig,
    low: int,
    high: int,
    per_source: dict[str, Counter[str]],
) -> int:
    """Write the shard's kept questions and its scores; returns how many questions have no answer yet."""
    work = difficulty_uri(out)
    grades = _stored_grades(work, shard, teacher)
    qds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    kept_rows: list[dict[str, Any]] = []
    qids: set[str] = set()
    missing = 0
    for q in qds.iter_rows(shards=[shard]):
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
            missing += 1
    band = {"filter": f"difficulty[{low},{high}]", "grading_version": GRADING_VERSION, "model": teacher.model}
    scores = list(_score_rows(work, shard, teacher, qids, low, high))  # one row per question
    storage.Dataset(scores_uri(out), SCORE_SCHEMA).write_shard(shard, scores, extra=band)
    dest = storage.Dataset(filtered_uri, QUESTION_SCHEMA)
    if missing:
        # An incomplete shard would silently be a different filter: withdraw it until re-run.
        if dest.is_committed(shard):
            dest.delete_shard(shard)
    else:
        dest.write_shard(shard, kept_rows, extra=band)
    return missing


async def afilter_by_difficulty(
    questions_uri: str,
    out: str,
    filtered_uri: str,
    *,
    teacher: TeacherConfig,
    low: int,
    high: int,
    api_keys: Mapping[str, str | SecretStr] | None = None,
    limiter: RateLimiter | None = None,
    shards: Sequence[str] | None = None,
    max_attempts: int = 6,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Grade every question's difficulty with ``teacher`` and keep those scored in ``[low, high]``.

    Scores are journalled per question under ``OUT/difficulty`` (keyed by question, grader
    model, :data:`GRADING_VERSION` and sampling params) before they count, so a re-run, or a
    run with another band, asks only for questions without a stored answer. Writes the kept
    questions to ``filtered_uri`` (QUESTION_SCHEMA, same shard names) and every answer to
    ``OUT/difficulty/scores`` (:data:`SCORE_SCHEMA`). A shard with questions whose requests failed
    after all attempts is not written to ``filtered_uri`` (the summary lists it; run again).
    Returns counts of kept / dropped / unscored / failed questions, in total and per source.
    """
    if not (isinstance(low, int) and isinstance(high, int) and SCALE[0] <= low <= high <= SCALE[1]):
        raise ConfigError(
            f"difficulty band needs integers {SCALE[0]} <= low <= high <= {SCALE[1]}, got {low}..{high}"
        )
    names = list(shards) if shards else shard_names(questions_uri)
    manifest = storage.Dataset(questions_uri, QUESTION_SCHEMA).manifest()
    absent = [s for s in names if s not in manifest]
    if absent:
        raise StorageError(f"questions shards not committed in {questions_uri}: {', '.join(absent)}")
    config = DistillConfig(
        teachers=[teacher],
        samples=1,
        prompt_version=GRADING_VERSION,
        max_attempts=max_attempts,
        backoff_base_s=backoff_base_s,
        backoff_max_s=backoff_max_s,
    )
    key = resolve_api_key(teacher, api_keys)  # a missing key fails here, before any work
    work = difficulty_uri(out)
    storage.ensure_writable(out)
    storage.ensure_writable(filtered_uri)
    limiter = limiter or LocalRateLimiter.for_teachers([teacher])
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(manifest[s].rows for s in names)
        bar = tqdm(total=total, unit="sample", desc="grade", file=sys.stderr, dynamic_ncols=True)
    tc = await asyncio.to_thread(EndpointClient, teacher, key)  # server-kind probe: off the loop
    per_source: dict[str, Counter[str]] = {}
    summary: dict[str, Any] = {"stored_before": 0}
    totals: Counter[str] = Counter()
    incomplete: list[str] = []
    aborted = None
    try:
        for shard in names:
            run = ShardRun(config, work, shard, {teacher.name: tc}, limiter, bar)
            await _grade_shard(questions_uri, shard, work, run, tc, summary)
            for k in ("new", "requests", "retries", "prompt_tokens", "completion_tokens"):
                totals[k] += getattr(run.counters, k)
            missing = await asyncio.to_thread(
                _commit_shard, questions_uri, shard, out, filtered_uri, teacher, low, high, per_source
            )
            if missing:
                incomplete.append(shard)
            if run.abort:
                aborted = run.abort
                break  # the grader is unreachable: the next shards would fail the same way
    finally:
        await tc.close()
        if bar is not None:
            bar.close()
    counts: Counter[str] = Counter()
    for c in per_source.values():
        counts.update(c)
    result = {
        "kept": counts["kept"],
        "dropped": counts["dropped"],
        "unscored": counts["unscored"],
        "failed": counts["failed"],
        "per_source": {
            s: {k: c[k] for k in ("kept", "dropped", "unscored", "failed")}
            for s, c in sorted(per_source.items())
        },
        "band": [low, high],
        "scale": list(SCALE),
        "grading_version": GRADING_VERSION,
        "grader": teacher.name,
        "model": teacher.model,
        "stored_before": summary["stored_before"],
        "new_scores": totals["new"],
        "requests": totals["requests"],
        "retries": totals["retries"],
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
        "shards": names,
        "incomplete_shards": incomplete,
        "complete": not incomplete and aborted is None,
        "aborted": aborted,
        "uri": filtered_uri,
        "scores_uri": scores_uri(out),
    }
    storage.write_json(storage.join(work, "summary.json"), result)
    return result


def filter_by_difficulty(
    questions_uri: str,
    out: str,
    filtered_uri: str,
    *,
    teacher: TeacherConfig,
    low: int,
    high: int,
    api_keys: Mapping[str, str | SecretStr] | None = None,
    limiter: RateLimiter | None = None,
    shards: Sequence[str] | None = None,
    max_attempts: int = 6,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Synchronous wrapper of :func:`afilter_by_difficulty` (runs its own event loop)."""
    return asyncio.run(
        afilter_by_difficulty(
            questions_uri,
            out,
            filtered_uri,
            teacher=teacher,
            low=low,
            high=high,
            api_keys=api_keys,
            limiter=limiter,
            shards=shards,
            max_attempts=max_attempts,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            progress=progress,
        )
    )
