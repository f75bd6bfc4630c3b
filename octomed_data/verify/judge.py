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
judge's memory and its cost ledger (tokens per judgement). A ``mode: batch`` judge sends its
requests through the Batch backend (:mod:`octomed_data.inference.batch_run`; records under
``filter/judge/_batches/<shard>/``) into the same journal, the same rows with ``batch_id``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.distill.journal import FAILED, iter_journal, row_key, segment_uris
from octomed_data.errors import OctomedError
from octomed_data.inference.batch_records import batch_dir
from octomed_data.inference.batch_run import BatchRun
from octomed_data.inference.client import EndpointClient, sample_seed
from octomed_data.inference.processor import RequestProcessor, request_kwargs
from octomed_data.inference.ratelimit import RateLimiter
from octomed_data.inference.replies import read_choice
from octomed_data.inference.retry import Backoff
from octomed_data.layout import journal_dir
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
    folders = storage.list_files(journal_dir(journal))
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


def _record(job: JudgeJob, teacher: TeacherConfig, attempts: int) -> dict[str, Any]:
    return {
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


class _Judging:
    """One shard's judgements: online requests, the Batch backend's side (keys, rows, fallback)."""

    version = JUDGE_RUBRIC_VERSION

    def __init__(self, proc: RequestProcessor, client: EndpointClient, report: JudgeReport) -> None:
        self.proc, self.client, self.report = proc, client, report

    def kwargs(self, job: Mapping[str, Any]) -> dict[str, Any]:
        messages = judge_messages(job["question"], job["reference"], job["candidate"])
        return request_kwargs(self.client, messages, self.seed(job, 0), 1)

    def key(self, q: Mapping[str, Any], model: str, version: str, params_hash: str, i: int) -> str:
        return q["key"]

    def seed(self, q: Mapping[str, Any], i: int) -> int:
        return sample_seed(0, q["key"], 0)

    async def one(self, job: Mapping[str, Any]) -> None:
        kwargs = self.kwargs(job)
        chars = sum(len(m["content"]) for m in kwargs["messages"])
        reply = await self.proc.request(self.client, kwargs, estimate=chars // 4 + 256)
        if reply.response is None:
            base = _record(JudgeJob(**job), self.client.teacher, reply.attempts)
            self.proc.add(base | {"reject_reason": FAILED, "error": reply.error})
        else:
            self.add(job, reply.response, reply.attempts, round(reply.latency, 4), None)

    def add(
        self,
        job: Mapping[str, Any],
        response: Any,
        attempts: int,
        latency: float | None,
        batch_id: str | None,
    ) -> None:
        choice = response.choices[0]
        reply = read_choice(choice)
        verdict = parse_verdict(reply.answer)
        usage = getattr(response, "usage", None)
        p_tok = usage.prompt_tokens if usage else 0
        c_tok = usage.completion_tokens if usage else 0
        self.report.prompt_tokens += p_tok
        self.report.completion_tokens += c_tok
        self.report.unparsed += verdict is None
        row = _record(JudgeJob(**job), self.client.teacher, attempts) | {
            "verdict": verdict,
            "status": "judged" if verdict is not None else "unparsed",
            "reply": (reply.answer or "")[-MAX_REPLY_CHARS:],
            "finish_reason": choice.finish_reason,
            "prompt_tokens": p_tok,
            "completion_tokens": c_tok,
            "latency_s": latency,
        }
        if batch_id is not None:
            row["batch_id"] = batch_id
        self.proc.add(row)

    def store(
        self,
        q: Mapping[str, Any],
        tc: EndpointClient,
        group: list[int],
        response: Any,
        seed: int | None,
        batch_id: str,
        skip: Container[int],
    ) -> list[int]:
        if 0 not in skip:
            self.add(q, response, 1, None, batch_id)
        return []

    async def fallback(self, tc: EndpointClient, wanted: list[tuple[Mapping[str, Any], list[int]]]) -> None:
        await self.proc.fan_out((self.one(job) for job, _ in wanted), 2 * tc.teacher.max_in_flight + 16)


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
    proc = RequestProcessor(
        {teacher.name: client},
        limiter=endpoint.limiter,
        max_attempts=endpoint.max_attempts,
        backoff=Backoff(endpoint.backoff_base_s, endpoint.backoff_max_s),
        folder=endpoint.journal,
        shard=shard,
        flush_every=endpoint.flush_every,
        flush_interval_s=endpoint.flush_interval_s,
        sleep=sleep,
    ).start()
    judging = _Judging(proc, client, report)
    batches = None
    if teacher.mode == "batch" or await asyncio.to_thread(_has_batch_records, endpoint.journal, shard):
        batches = BatchRun(proc, judging)

    async def works() -> AsyncIterator[Awaitable[None]]:
        done: set[str] = set()
        if batches is not None:
            await batches.load()  # earlier runs' live batches: collected, never paid twice
            done = set(await asyncio.to_thread(read_judgements, endpoint.journal, shard))
        for job in jobs:
            if proc.abort:
                break
            report.jobs += 1
            if batches is not None and job.key in batches.live:
                continue  # a live batch of an earlier run brings it
            if batches is not None and teacher.mode == "batch":
                await batches.add(job.key, asdict(job), client, judging.kwargs(asdict(job))["messages"], [0])
                continue
            yield judging.one(asdict(job))
        if batches is not None:
            await batches.flush()
            yield batches.collect(done)

    try:
        await proc.fan_out(works(), proc.queue_limit())
    finally:
        await proc.close()
        if batches is not None:
            await batches.close()
    if batches is not None:
        await batches.finish()  # their judgements are durable now: the batches are collected
    report.judged, report.failed = proc.counters.stored, proc.counters.failed
    report.requests, report.retries = proc.counters.requests, proc.counters.retries
    report.aborted = proc.abort
    return report


def _has_batch_records(folder: str, shard: str) -> bool:
    return bool(storage.list_files(batch_dir(folder, shard), ".json"))
