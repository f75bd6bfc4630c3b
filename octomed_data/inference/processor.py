"""THE request processor: bounded fan-out, the journal, retry accounting and abort, written once.

Distillation (:mod:`octomed_data.distill.engine`), the LLM judge (:mod:`octomed_data.verify.judge`),
difficulty grading (:mod:`octomed_data.distill.filtering`) and the evaluation OpenAI backend send
their requests through one :class:`RequestProcessor` (the shape of curator's request
processors): it holds the endpoint clients, the rate limiter, the backoff and the journal of one
shard. :meth:`RequestProcessor.request` is one chat completion through THE request path
(:func:`~octomed_data.inference.client.request_with_retries`), counted (requests, retries);
once a teacher's breaker trips, :attr:`RequestProcessor.abort` says why and every request stops.
:meth:`RequestProcessor.fan_out` runs the requests with a bound on what is queued and re-raises
the first failure. Records go to the journal (:class:`~octomed_data.inference.journal.JournalWriter`)
and count (:attr:`Counters.stored`) only once durable. Online is the default backend; the Batch
backend (:class:`~octomed_data.inference.batch_run.BatchRun`) sends a ``mode: batch`` teacher's
requests through the Files + Batch API into the same journal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from octomed_data.inference.client import EndpointClient, request_with_retries
from octomed_data.inference.journal import JournalWriter
from octomed_data.inference.ratelimit import LocalRateLimiter, RateLimiter
from octomed_data.inference.retry import Backoff
from octomed_data.teachers import TeacherConfig, resolve_api_key


@dataclass
class Counters:
    """What a processor did (exact): durable records, attempts, tokens."""

    stored: int = 0  # records journalled as answered (durable)
    failed: int = 0  # records journalled as failed after every attempt (durable)
    requests: int = 0  # HTTP attempts
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Reply:
    """One request's outcome: the response (None: failed), attempts, latency, last error."""

    response: Any | None
    attempts: int
    latency: float
    error: str | None


def request_kwargs(tc: EndpointClient, messages: list[dict[str, Any]], seed: int, n: int) -> dict[str, Any]:
    """The chat-completions request for ``n`` samples (online or in a batch): the teacher's sampling."""
    teacher = tc.teacher
    return {
        "model": teacher.model,
        "messages": messages,
        "temperature": teacher.temperature,
        "top_p": teacher.top_p,
        "max_tokens": teacher.max_tokens,
        **tc.request_fields(seed, n),
    }


def open_clients(
    teachers: Iterable[TeacherConfig], api_keys: Mapping[str, str | SecretStr] | None = None
) -> dict[str, EndpointClient]:
    """One client per teacher (its key from ``api_keys``, else its env variable); blocking (server
    kinds are detected over HTTP): call it off the event loop."""
    return {t.name: EndpointClient(t, resolve_api_key(t, api_keys)) for t in teachers}


CANCEL_WAIT_S = 10.0  # how long a failed fan-out waits for its cancelled tasks to unwind


def raise_failed(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Re-raise the exception of the first finished task that failed. Every finished task's
    exception is retrieved, so several tasks failing at once (a lost lease fails them all) leave
    no "Task exception was never retrieved" traceback behind."""
    failed = [t.exception() for t in tasks if t.done() and not t.cancelled()]
    first = next((e for e in failed if e is not None), None)
    if first is not None:
        raise first


class RequestProcessor:
    """One shard's (or one backend's) requests: clients, limiter, journal, counters, abort."""

    def __init__(
        self,
        clients: Mapping[str, EndpointClient],
        *,
        limiter: RateLimiter | None = None,
        max_attempts: int = 6,
        backoff: Backoff | None = None,
        folder: str | None = None,
        shard: str = "",
        flush_every: int = 256,
        flush_interval_s: float = 0.5,
        progress: Any = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.clients = dict(clients)
        self.limiter = limiter or LocalRateLimiter.for_teachers([c.teacher for c in self.clients.values()])
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self.folder = folder  # where the journal (and batch records) live; None: no journal
        self.shard = shard
        self.progress = progress
        self.sleep = sleep
        self.counters = Counters()
        self.abort: str | None = None  # a teacher's breaker tripped: every request stops
        self.journal = (
            JournalWriter(folder, shard, flush_every, flush_interval_s, on_durable=self._durable)
            if folder is not None
            else None
        )

    def start(self) -> RequestProcessor:
        """Start the journal's writer (on the running loop)."""
        if self.journal is not None:
            self.journal.start()
        return self

    def _durable(self, stored: int, failed: int) -> None:
        # Done means durable: records count once the journal segment holding them is written.
        self.counters.stored += stored
        self.counters.failed += failed
        if self.progress is not None and stored:
            self.progress.update(stored)

    def add(self, record: dict[str, Any]) -> None:
        """Journal one finished (or finally failed) record."""
        assert self.journal is not None, "this processor has no journal"
        self.journal.add(record)

    def _attempted(self, attempt: int) -> None:
        self.counters.requests += 1
        if attempt > 1:
            self.counters.retries += 1

    async def request(
        self,
        tc: EndpointClient,
        kwargs: dict[str, Any],
        *,
        estimate: int | None = None,
        n: int = 1,
    ) -> Reply:
        """One chat completion with retries, holding one of the teacher's in-flight slots."""
        if estimate is None:
            chars = sum(len(str(m["content"])) for m in kwargs["messages"])
            estimate = chars // 4 + int(tc.avg_completion) * n
        async with tc.slots:
            response, attempts, latency, error = await request_with_retries(
                tc,
                kwargs,
                max_attempts=self.max_attempts,
                backoff=self.backoff,
                limiter=self.limiter,
                estimate=estimate,
                n=n,
                sleep=self.sleep,
                stop=lambda: self.abort,
                on_attempt=self._attempted,
            )
        if response is None and tc.breaker.tripped and not self.abort:
            self.abort = tc.breaker.tripped  # every request stops; what is journalled stays
        return Reply(response, attempts, latency, error)

    async def fan_out(
        self, works: Iterable[Awaitable[Any]] | AsyncIterable[Awaitable[Any]], limit: int
    ) -> None:
        """Run ``works`` concurrently, at most ``limit`` queued at once (tasks beyond the in-flight
        bound wait on a slot: keep a small queue of them, no more); the first failure is re-raised
        and the rest cancelled."""
        tasks: set[asyncio.Task[Any]] = set()

        async def add(work: Awaitable[Any]) -> None:
            nonlocal tasks
            while len(tasks) >= limit:
                finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                raise_failed(finished)
            tasks.add(asyncio.ensure_future(work))

        try:
            if isinstance(works, AsyncIterable):
                async for work in works:
                    await add(work)
            else:
                for work in works:
                    await add(work)
            while tasks:  # the first failure ends the wait (the rest are cancelled below)
                finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                raise_failed(finished)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:  # let them unwind, and retrieve what they ended with
                done, _ = await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)
                for task in done:
                    if not task.cancelled():
                        task.exception()
            if isinstance(works, AsyncGenerator):
                await works.aclose()

    def queue_limit(self) -> int:
        """About twice the clients' in-flight bound: what :meth:`fan_out` keeps queued."""
        return 2 * sum(c.teacher.max_in_flight for c in self.clients.values()) + 16

    async def close(self) -> None:
        """Flush and stop the journal, close every client."""
        try:
            if self.journal is not None:
                await self.journal.close()
        finally:
            for c in self.clients.values():
                await c.close()
