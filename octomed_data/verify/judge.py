"""The LLM judge's requests: async, bounded, journalled and resumable like distillation.

Every judgement is one chat completion through THE request path
(:func:`~octomed_data.inference.client.request_with_retries` on an
:class:`~octomed_data.inference.client.EndpointClient`: rate limiter, retries with backoff and
Retry-After, the dead-endpoint breaker) with the versioned rubric
(:func:`~octomed_data.prompts.judge_messages`). Its result is appended to the distillation's
journal machinery (:class:`~octomed_data.distill.journal.JournalWriter`: append-only zstd segments
written whole through the storage layer) under ``filter/judge/_journal/<shard>/``. A judgement
counts as done once its segment is written; its key is the sample's key + judge model + judge
sampling parameters + rubric version, so a re-run (after a crash, or of a re-distilled shard)
requests only what the journal does not hold, and a new rubric or judge asks again. A request that
fails after every attempt is journalled as a failure (not done): the shard stops incomplete and
the next run retries exactly those. The journal is kept after the shard is committed: it is the
judge's memory and its cost ledger (tokens per judgement).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import SecretStr

from octomed_data.distill.journal import FAILED, JournalWriter, iter_journal, row_key, segment_uris
from octomed_data.errors import OctomedError
from octomed_data.inference.client import EndpointClient, request_with_retries, sample_seed
from octomed_data.inference.ratelimit import LocalRateLimiter, RateLimiter
from octomed_data.inference.replies import read_choice
from octomed_data.inference.retry import Backoff
from octomed_data.prompts import JUDGE_RUBRIC_VERSION, judge_messages
from octomed_data.teachers import TeacherConfig

# The judge's last "VERDICT: CORRECT|INCORRECT" line is its verdict (bold and quotes tolerated).
_VERDICT = re.compile(r"VERDICT\s*[:=\-]?\s*[*_\"'`]*\s*(CORRECT|INCORRECT)\b", re.IGNORECASE)
MAX_REPLY_CHARS = 400  # of the judge's reply kept in the journal (its reasons, for people)


class JudgeIncomplete(OctomedError):
    """Some judge requests failed after every attempt (or the judge went down): re-run the shard."""


@dataclass(frozen=True)
class JudgeJob:
    """One reply to judge: its key, where it came from, and what the judge is shown."""

    key: str
    question_id: str
    sample_idx: int
    source: str
    purpose: str  # open (decides the verdict) | calibration (a closed reply, compared with exact match)
    question: str
    reference: str
    candidate: str


@dataclass
class JudgeEndpoint:
    """Where judgements go: the judge teacher, its key (SecretStr only), the journal folder, limits."""

    teacher: TeacherConfig
    api_key: SecretStr
    journal: str  # the folder holding ``_journal/<shard>/`` (FilterFolder.judge)
    max_attempts: int = 6
    limiter: RateLimiter | None = None
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    flush_every: int = 64
    flush_interval_s: float = 0.5


@dataclass
class JudgeReport:
    """What one pass of judge requests over a shard did (counts are exact)."""

    jobs: int = 0  # judgements this pass needed (not in the journal)
    judged: int = 0  # durable judgements written by this pass (unparsed replies included)
    unparsed: int = 0
    failed: int = 0  # requests that failed after every attempt
    requests: int = 0  # HTTP attempts
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    aborted: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_key(row: Mapping[str, Any], teacher: TeacherConfig) -> str:
    """A judgement's identity: the sample's key + judge model + its sampling params + rubric version."""
    return f"{row_key(dict(row))}|{teacher.model}|{teacher.params_hash()}|{JUDGE_RUBRIC_VERSION}"


def parse_verdict(text: str | None) -> bool | None:
    """The judge's last stated verdict: True (correct), False (incorrect), None (none stated)."""
    found = _VERDICT.findall(text or "")
    return found[-1].upper() == "CORRECT" if found else None


def iter_judgements(journal: str, shard: str) -> Iterator[dict[str, Any]]:
    """Every journalled judgement of a shard (failures included), oldest segment first."""
    yield from iter_journal(journal, shard)


def read_judgements(journal: str, shard: str) -> dict[str, dict[str, Any]]:
    """key -> the first durable judgement of that key (failures are not judgements)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in iter_judgements(journal, shard):
        if rec.get("reject_reason") != FAILED:
            out.setdefault(rec["key"], rec)
    return out


def journal_shards(journal: str) -> list[str]:
    """The shards that have judge journal segments (for the cost ledger)."""
    from octomed_data import storage

    folders = storage.list_files(storage.join(journal, "_journal"))
    return [n for n in (u.rstrip("/").rsplit("/", 1)[-1] for u in folders) if segment_uris(journal, n)]


def judge_cost(journal: str, teacher: TeacherConfig | None) -> dict[str, Any]:
    """Every judgement ever paid for (all journalled requests, failures included), priced."""
    requests = prompt = completion = 0
    for shard in journal_shards(journal):
        for rec in iter_judgements(journal, shard):
            requests += 1
            prompt += rec.get("prompt_tokens") or 0
            completion += rec.get("completion_tokens") or 0
    usd = teacher.cost_usd(prompt, completion) if teacher is not None else 0.0
    return {
        "judge": teacher.name if teacher else None,
        "model": teacher.model if teacher else None,
        "rubric_version": JUDGE_RUBRIC_VERSION,
        "journalled": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd": round(usd, 8),
    }


async def ajudge(
    jobs: Iterable[JudgeJob],
    endpoint: JudgeEndpoint,
    shard: str,
    *,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> JudgeReport:
    """Send every job to the judge (bounded in flight) and journal the judgements; see the module doc.

    ``jobs`` is consumed lazily (the caller streams them out of the raw shard); jobs already in the
    journal must not be in it. Stops early, with :attr:`JudgeReport.aborted`, once the judge's
    breaker trips.
    """
    teacher = endpoint.teacher
    report = JudgeReport()
    # Server kinds are detected over HTTP once per URL: off the event loop.
    client = await asyncio.to_thread(EndpointClient, teacher, endpoint.api_key)
    limiter = endpoint.limiter or LocalRateLimiter.for_teachers([teacher])
    backoff = Backoff(endpoint.backoff_base_s, endpoint.backoff_max_s)

    def durable(stored: int, failed: int) -> None:  # done means durable, as in distillation
        report.judged += stored
        report.failed += failed

    journal = JournalWriter(
        endpoint.journal, shard, endpoint.flush_every, endpoint.flush_interval_s, on_durable=durable
    ).start()
    abort: list[str | None] = [None]

    def attempted(attempt: int) -> None:
        report.requests += 1
        report.retries += attempt > 1

    async def one(job: JudgeJob) -> None:
        messages = judge_messages(job.question, job.reference, job.candidate)
        kwargs: dict[str, Any] = {
            "model": teacher.model,
            "messages": messages,
            "temperature": teacher.temperature,
            "top_p": teacher.top_p,
            "max_tokens": teacher.max_tokens,
            **client.request_fields(sample_seed(0, job.key, 0), 1),
        }
        chars = sum(len(m["content"]) for m in messages)
        async with client.slots:
            response, attempts, latency, error = await request_with_retries(
                client,
                kwargs,
                max_attempts=endpoint.max_attempts,
                limiter=limiter,
                estimate=chars // 4 + 256,
                backoff=backoff,
                sleep=sleep,
                stop=lambda: abort[0],
                on_attempt=attempted,
            )
        base = {
            "key": job.key,
            "question_id": job.question_id,
            "sample_idx": job.sample_idx,
            "source": job.source,
            "purpose": job.purpose,
            "judge": teacher.name,
            "model": teacher.model,
            "rubric_version": JUDGE_RUBRIC_VERSION,
            "attempts": attempts,
            "created_at": int(time.time() * 1000),
        }
        if response is None:
            if client.breaker.tripped and not abort[0]:
                abort[0] = client.breaker.tripped  # every request stops; what is journalled stays
            journal.add(base | {"reject_reason": FAILED, "error": error})
            return
        choice = response.choices[0]
        reply = read_choice(choice)
        verdict = parse_verdict(reply.answer)
        usage = getattr(response, "usage", None)
        p_tok = usage.prompt_tokens if usage else 0
        c_tok = usage.completion_tokens if usage else 0
        report.prompt_tokens += p_tok
        report.completion_tokens += c_tok
        report.unparsed += verdict is None
        journal.add(
            base
            | {
                "verdict": verdict,
                "status": "judged" if verdict is not None else "unparsed",
                "reply": (reply.answer or "")[-MAX_REPLY_CHARS:],
                "finish_reason": choice.finish_reason,
                "prompt_tokens": p_tok,
                "completion_tokens": c_tok,
                "latency_s": round(latency, 4),
            }
        )

    tasks: set[asyncio.Task[None]] = set()
    limit = 2 * teacher.max_in_flight + 16  # tasks beyond the in-flight bound wait; keep few of them
    try:
        for job in jobs:
            if abort[0]:
                break
            report.jobs += 1
            while len(tasks) >= limit:
                finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                _raise_failed(finished)
            tasks.add(asyncio.create_task(one(job)))
        if tasks:
            finished, tasks = await asyncio.wait(tasks)
            _raise_failed(finished)
    finally:
        for task in tasks:
            task.cancel()
        await journal.close()
        await client.close()
    report.aborted = abort[0]
    return report


def _raise_failed(tasks: set[asyncio.Task[None]]) -> None:
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
