"""THE inference client: one OpenAI-compatible endpoint, and THE request path to it.

Distillation (:mod:`octomed_data.distill.engine`), difficulty grading
(:mod:`octomed_data.distill.filtering`) and evaluation all send chat completions through
:func:`request_with_retries` on an :class:`EndpointClient`: every attempt waits for the rate
limiter, is bounded end to end by the teacher's timeout, is classified (retryable or not,
connection-level or not, Retry-After honoured through :class:`~octomed_data.inference.retry.Backoff`),
feeds the endpoint's :class:`~octomed_data.inference.retry.Breaker`, and errors are scrubbed of keys.

The wire is a :class:`Transport`. The default for chat completions is the lean
:class:`~octomed_data.inference.transport_http.HTTPTransport` (aiohttp + orjson, no per-request
model objects: measured 2-4x less client CPU per request than the SDK); :class:`OpenAITransport`
(the OpenAI SDK) stays selectable (``EndpointClient(..., transport="sdk")`` or
``OCTOMED_INFERENCE_TRANSPORT=sdk``) for what the SDK earns its
place with: auth variants (Azure deployments, OAuth token providers, organisation/project
headers) and, later, the Batch and Files APIs.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import openai
from pydantic import SecretStr

from octomed_data.errors import ConfigError, OctomedError
from octomed_data.inference.fleet import FleetTransport, describe, public_url, served_by
from octomed_data.inference.outage import outage_breaker
from octomed_data.inference.ratelimit import RateLimiter
from octomed_data.inference.retry import (
    BREAKER_THRESHOLD,
    Backoff,
    Breaker,
    Failure,
    Tripped,
)
from octomed_data.inference.servers import ServerKind, detect_kind, profile
from octomed_data.inference.transport_http import HTTPTransport
from octomed_data.inference.wire import (
    Transport,
    classify,
    scrub,
)
from octomed_data.teachers import TeacherConfig


class TeacherUnreachable(OctomedError):
    """A teacher (endpoint) is dead: none of its requests succeeded, or it went down mid-run."""


def sample_seed(base: int, question_id: str, sample_idx: int) -> int:
    """Per-sample request seed: stable across runs, different for every (question, sample)."""
    digest = hashlib.blake2b(f"{base}|{question_id}|{sample_idx}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


class OpenAITransport:
    """Chat completions through the OpenAI SDK's async client (``transport="sdk"``).

    Not the default: its typed responses and httpx machinery cost 2-4x the lean transport's client
    CPU per request (BENCHMARKS.md, distillation request path). It stays for what it does that the
    lean path does not: auth variants (Azure, token providers, organisation/project headers) and
    the Batch/Files APIs a batch mode will use. Its own retries are off (``max_retries=0``):
    :func:`request_with_retries` retries, counting attempts and honouring Retry-After.
    """

    def __init__(self, base_url: str, key: SecretStr, timeout_s: float) -> None:
        self.sdk = openai.AsyncOpenAI(
            api_key=key.get_secret_value(), base_url=base_url, max_retries=0, timeout=timeout_s
        )

    async def chat(self, **kwargs: Any) -> Any:
        return await self.sdk.chat.completions.create(**kwargs)

    async def probe(self) -> None:
        """``GET /models``: the cheap request a fleet sends to an ejected replica (raises if down)."""
        try:
            await self.sdk.models.list()
        except openai.APIStatusError as exc:
            if exc.status_code >= 500:
                raise  # below 500 the server answered: it is up

    def classify(self, exc: BaseException) -> Failure:
        return classify(exc)

    async def close(self) -> None:
        await self.sdk.close()


TRANSPORT_ENV = "OCTOMED_INFERENCE_TRANSPORT"
TRANSPORTS = ("http", "sdk")


def make_transport(teacher: TeacherConfig, key: SecretStr, name: str | None = None) -> Transport:
    """A transport by name: ``http`` (the lean path, default) or ``sdk`` (the OpenAI SDK).

    Without a name, ``$OCTOMED_INFERENCE_TRANSPORT`` decides (``http`` when unset). A teacher with
    several ``endpoints`` gets a :class:`~octomed_data.inference.fleet.FleetTransport` over one
    such transport per replica.
    """
    name = name or os.environ.get(TRANSPORT_ENV) or "http"
    if name not in TRANSPORTS:
        raise ConfigError(f"unknown inference transport {name!r} (choose from {', '.join(TRANSPORTS)})")

    def one(url: str) -> Transport:
        if name == "sdk":
            return OpenAITransport(url, key, teacher.timeout_s)
        return HTTPTransport(
            url,
            key,
            teacher.timeout_s,
            max_connections=teacher.max_in_flight,
            connect_timeout_s=teacher.connect_timeout_s,
        )

    urls = teacher.replica_urls()
    if len(urls) == 1:
        return one(urls[0])
    return FleetTransport(
        [(url, one(url)) for url in urls],
        name=teacher.name,
        probe_after_s=teacher.replica_probe_s,
        probe_max_s=teacher.replica_probe_max_s,
    )


def detect_teacher_kind(teacher: TeacherConfig, key: SecretStr) -> ServerKind:
    """The teacher's server kind: configured, else detected at the first replica that says more
    than ``generic`` (a replica that is down when the run starts is skipped)."""
    kind = ServerKind.GENERIC
    for url in teacher.replica_urls():
        kind = detect_kind(url, key.get_secret_value(), teacher.server)
        if teacher.server != "auto" or kind != ServerKind.GENERIC:
            break
    return kind


class EndpointClient:
    """One endpoint (a teacher): its transport, concurrency bound, breaker, and what its server accepts."""

    def __init__(
        self,
        teacher: TeacherConfig,
        key: SecretStr,
        kind: ServerKind | None = None,
        *,
        transport: Transport | str | None = None,
        breaker_threshold: int = BREAKER_THRESHOLD,
    ) -> None:
        self.teacher = teacher
        self._key = key
        self.kind = kind or detect_teacher_kind(teacher, key)
        self.profile = profile(self.kind)
        self.supports_n = teacher.supports_n if teacher.supports_n is not None else self.profile.honours_n
        self.sends_seed = teacher.seed_policy == "per_sample" and self.profile.accepts_seed
        if transport is None or isinstance(transport, str):
            transport = make_transport(teacher, key, transport)
        self.transport: Transport = transport
        self.slots = asyncio.Semaphore(teacher.max_in_flight)
        self.params_hash = teacher.params_hash()
        # The endpoint rows record for a single-endpoint teacher (a fleet's replies name their own).
        self.endpoint = public_url(teacher.base_url)
        # One breaker per teacher: the outage rule is time (the teacher's outage budget, health
        # probes while requests are in flight: octomed_data.inference.outage); ``breaker_threshold``
        # is the never-worked rule's count. A fleet reports one replica's failures as failovers,
        # so only all replicas down spends the budget.
        self.breaker: Breaker = outage_breaker(
            teacher.name, describe(teacher.replica_urls()), breaker_threshold, teacher
        )
        self.breaker.probe = getattr(self.transport, "probe", None)
        self.avg_completion = float(min(teacher.max_tokens, 1024))

    @property
    def secret(self) -> str:
        return self._key.get_secret_value()

    def request_fields(
        self, seed: int | None, n: int, extra_body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The optional request fields this server accepts: seed, n, neutral sampling + ``extra_body``
        (the teacher's own when not given)."""
        neutral = self.profile.neutral_sampling
        if extra_body is None:
            extra_body = self.teacher.extra_body
        else:
            neutral = {}  # a caller's resolved extras are complete (eval's sampling_extras: off)
        fields: dict[str, Any] = {}
        if seed is not None and self.sends_seed:
            fields["seed"] = seed
        if n > 1:
            fields["n"] = n
        # The user's extra_body wins over the neutral values (e.g. a deliberate top_k).
        extra = {**neutral, **(extra_body or {})}
        if extra:
            fields["extra_body"] = extra
        return fields

    def endpoint_of(self, response: Any) -> str:
        """The endpoint (public URL, no secrets) that served ``response``: its replica in a fleet."""
        return served_by(response) or self.endpoint

    async def close(self) -> None:
        try:
            await self.breaker.close()
        finally:
            await self.transport.close()


_request_ids = itertools.count()


async def request_with_retries(
    client: EndpointClient,
    kwargs: dict[str, Any],
    *,
    max_attempts: int,
    limiter: RateLimiter,
    estimate: int,
    backoff: Callable[[int, float | None], float] = Backoff(),
    n: int = 1,
    sleep: Callable[[float], Any] = asyncio.sleep,
    stop: Callable[[], str | None] = lambda: None,
    on_attempt: Callable[[int], None] | None = None,
) -> tuple[Any | None, int, float, str | None]:
    """One chat-completions call with retries: THE request path (distillation, grading, evaluation).

    Every attempt waits for the rate limiter, is bounded end to end by the teacher's timeout, and a
    failure is classified (retryable or not, Retry-After honoured through ``backoff``) and reported
    to the client's breaker. Returns (response or None, attempts made, latency of the successful
    attempt, last error with secrets scrubbed). ``stop()`` returning a message, or the breaker
    tripping, ends the retries early (a request stopped so does not count as given up).
    A connection-level failure while the teacher is down (no reply since the attempt was sent, no
    answer to a health probe) uses up no attempt: the breaker's outage budget decides when to
    stop (:mod:`octomed_data.inference.outage`). ``max_attempts=1`` turns every retry off, these
    included.
    """
    breaker = client.breaker
    request = next(_request_ids)
    breaker.enter()
    try:
        return await _attempts(
            client,
            breaker,
            request,
            kwargs,
            max_attempts,
            limiter,
            estimate,
            backoff,
            n,
            sleep,
            stop,
            on_attempt,
        )
    finally:
        breaker.leave()


async def _attempts(
    client: EndpointClient,
    breaker: Breaker,
    request: int,
    kwargs: dict[str, Any],
    max_attempts: int,
    limiter: RateLimiter,
    estimate: int,
    backoff: Callable[[int, float | None], float],
    n: int,
    sleep: Callable[[float], Any],
    stop: Callable[[], str | None],
    on_attempt: Callable[[int], None] | None,
) -> tuple[Any | None, int, float, str | None]:
    teacher = client.teacher
    last_error: str | None = None
    attempt = 0  # attempts made
    counted = 0  # attempts that count against max_attempts
    while True:
        reason = stop() or breaker.tripped
        if reason:
            return None, attempt, 0.0, last_error or reason
        await limiter.acquire(teacher.name, estimate)
        attempt += 1
        if on_attempt is not None:
            on_attempt(attempt)
        started = time.monotonic()
        replies = breaker.replies
        try:
            # The transport's timeout bounds each read, not the whole reply: a server that
            # trickles bytes could hold a slot for ever. This bounds the request end to end.
            async with asyncio.timeout(teacher.timeout_s):  # no extra task, unlike wait_for
                # cancelled when the endpoint is declared dead
                response = await breaker.guard(client.transport.chat(**kwargs))
            if not getattr(response, "choices", None):
                raise ValueError("response has no choices")
        except Tripped as tripped:
            limiter.record_usage(teacher.name, estimate, 0)
            return None, attempt, 0.0, last_error or str(tripped)  # stopped, not given up
        except Exception as exc:  # every client-side failure is classified, none escapes
            failure = client.transport.classify(exc)
            last_error = scrub(str(failure), [client.secret])
            limiter.record_usage(teacher.name, estimate, 0)
            failed_at = breaker.clock()
            breaker.failed(request, failure, last_error)
            if breaker.tripped:
                return None, attempt, 0.0, last_error  # stopped: the endpoint is down
            # The outage rule: while the teacher is down (no reply to any request since this
            # attempt was sent, and no answer to a health probe), its outage budget decides, not
            # this request's attempts.
            outage = (
                max_attempts > 1  # one attempt asked for: no retry at all, outage waits included
                and failure.outage
                and failure.retryable
                and breaker.time_based
                and breaker.replies == replies
                and await breaker.down(failed_at)
            )
            if breaker.tripped:
                return None, attempt, 0.0, last_error
            if not outage:
                counted += 1
            if not failure.retryable or counted >= max_attempts:
                breaker.request_gave_up(attempt, last_error)
                return None, attempt, 0.0, last_error
            delay = backoff(min(attempt, 16), failure.delay)
            if outage and failure.delay is None:
                delay = min(delay, breaker.retry_max_s)  # notice a teacher back within seconds
            await breaker.pause(delay, sleep)
            continue
        latency = time.monotonic() - started
        usage = getattr(response, "usage", None)
        used = (usage.prompt_tokens + usage.completion_tokens) if usage else estimate
        limiter.record_usage(teacher.name, estimate, used)
        if usage and usage.completion_tokens:
            client.avg_completion = 0.9 * client.avg_completion + 0.1 * usage.completion_tokens / n
        breaker.succeeded()
        return response, attempt, latency, None
