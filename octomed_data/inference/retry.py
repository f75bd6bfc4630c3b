"""Retry policy for one endpoint: what a failure is, how long to back off, when the endpoint is dead.

Nothing here knows a transport: :class:`Failure` is what a transport's ``classify`` turns its own
exceptions into, :class:`Backoff` is THE backoff (exponential with jitter, a server's Retry-After
honoured), and :class:`Breaker` is THE dead-endpoint check shared by every request in flight to one
endpoint (distillation, difficulty grading and evaluation all go through it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

log = logging.getLogger("octomed_data.inference")

# Distinct requests failing in a row (outage rule) or giving up with none ever succeeding
# (never-worked rule) before the endpoint counts as dead. Override per client.
BREAKER_THRESHOLD = 8


class Failure(Exception):
    """One failed attempt, classified.

    ``retryable``: another attempt may succeed. ``delay``: the server's Retry-After, when it sent
    one. ``outage``: a connection-level failure (refused/reset connection, timeout, HTTP 5xx): the
    endpoint itself may be down. The breaker counts only these; a 4xx or a malformed 200 is a reply.
    ``mode``: how an outage looks, in a few words for the outage line (``connection refused``,
    ``HTTP 503``, ``timed out``); the message when not given.
    """

    def __init__(
        self,
        message: str,
        retryable: bool,
        delay: float | None = None,
        outage: bool = False,
        mode: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.delay = delay
        self.outage = outage
        self.mode = mode or message


def parse_retry_after(
    headers: Mapping[str, str] | None, now: Callable[[], float] = time.time
) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date), or None."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - now())
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt ``attempt + 1``: exponential from ``base_s``, capped at ``max_s``, jittered.

    A server's Retry-After (``hint``) wins and is not capped (the server knows its own limit), with a
    little jitter on top so synchronised clients do not all come back in the same instant.
    """

    base_s: float = 1.0
    max_s: float = 60.0

    def __call__(self, attempt: int, hint: float | None = None) -> float:
        if hint is not None:
            return hint * (1.0 + 0.1 * random.random())
        base = min(self.max_s, self.base_s * (2 ** (attempt - 1)))
        return base * (0.5 + random.random())  # full-ish jitter: spread synchronised retries


class Tripped(Exception):
    """Raised by :meth:`Breaker.guard` when the breaker trips while a request is in flight."""


class Breaker:
    """THE dead-endpoint check for one endpoint, fed by every attempt of every request to it.

    It trips on whichever rule comes first:

    * outage: ``threshold`` distinct requests in a row failed at the connection level (refused or
      reset connection, timeout, HTTP 5xx) with no reply from the server in between, at any time
      in the run, also after many successes. Counting distinct requests, not attempts, keeps a few
      poisoned prompts retried over and over from looking like an outage.
    * never worked: ``threshold`` requests gave up (all attempts, any error, 400s included) and
      none has succeeded yet: a config problem (bad model name, key, parameter).

    Once tripped, :attr:`tripped` holds one line saying why, every request stops before its next
    attempt, and requests sleeping in a backoff wake at once (:meth:`pause`). A warning is logged
    when failures start to pile up (at half the threshold), so a stalled run does not look frozen.

    :class:`~octomed_data.inference.outage.OutageBreaker` (every endpoint client's) replaces the
    counted outage rule by time (``time_based``): see :mod:`octomed_data.inference.outage`.
    """

    time_based = False  # True: outage failures are judged by time, and use up no request attempts
    retry_max_s = float("inf")  # the longest backoff after an outage failure (time-based breakers)

    def __init__(
        self,
        name: str,
        url: str,
        threshold: int = BREAKER_THRESHOLD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.url = url
        self.threshold = max(1, threshold)
        self.clock = clock
        self.successes = 0
        self.replies = 0  # answers from the server (successes and errors it chose to send)
        self.gave_up = 0  # requests that failed after all their attempts
        self.last_error: str | None = None
        self.tripped: str | None = None
        self._last_success: float | None = None
        self._streak: set[int] = set()  # requests failed (connection level) since the last reply
        self._streak_failures = 0  # attempts in the streak
        self._streak_started = 0.0
        self._warned = False
        self._event: asyncio.Event | None = None
        self._in_flight: set[asyncio.Future[Any]] = set()  # guarded calls, cancelled on a trip

    @property
    def warn_at(self) -> int:
        return max(1, self.threshold // 2)

    def succeeded(self) -> None:
        self.successes += 1
        self._last_success = self.clock()
        self.replied()

    def replied(self) -> None:
        """The server answered (a success, or an error it chose to send): the endpoint is up."""
        self.replies += 1
        if self._warned and self._streak:
            log.info(
                "teacher %r at %s answers again after %d failures", self.name, self.url, self._streak_failures
            )
        self._streak.clear()
        self._streak_failures = 0
        self._warned = False

    def failed(self, request: int, failure: Failure, error: str) -> None:
        """Attempt of ``request`` failed with ``failure`` (``error``: its scrubbed one-line text)."""
        if not failure.outage:
            self.replied()
            return
        now = self.clock()
        if not self._streak:
            self._streak_started = now
        self._streak.add(request)
        self._streak_failures += 1
        span = now - self._streak_started
        if len(self._streak) >= self.threshold:
            if self.successes:
                since = now - (self._last_success or now)
                detail = (
                    f"{error}; {self.successes} requests had succeeded, the last {since:.1f} s ago "
                    f"({self._streak_failures} consecutive failures over {span:.1f} s)"
                )
            else:
                detail = f"{error}; none succeeded ({self._streak_failures} consecutive failures over {span:.1f} s)"
            self.trip(f"teacher {self.name!r} at {self.url} unreachable: {detail}")
        elif len(self._streak) >= self.warn_at and not self._warned:
            self._warned = True
            log.warning(
                "teacher %r at %s: %d requests failed in a row over %.1f s (%s); retrying, stopping at %d",
                self.name,
                self.url,
                len(self._streak),
                span,
                error,
                self.threshold,
            )

    def request_gave_up(self, attempts: int, error: str | None) -> None:
        """A request failed after ``attempts`` attempts (its last error ``error``)."""
        self.gave_up += 1
        self.last_error = error
        if self.successes == 0 and self.gave_up >= self.threshold:
            tries = "attempt" if attempts == 1 else "attempts"
            self.trip(
                f"teacher {self.name!r} at {self.url}: {self.gave_up} samples failed "
                f"(the last after {attempts} {tries}) and none succeeded; last error: {error}"
            )

    def enter(self) -> None:
        """A request starts (its retries included); a time-based breaker watches while any wait."""

    def leave(self) -> None:
        """The request that :meth:`enter` announced is over."""

    async def close(self) -> None:
        """Stop what the breaker runs in the background (nothing here)."""

    async def down(self, since: float) -> bool:
        """Is the endpoint down (asked after a failure at ``since``)? A counting breaker cannot
        tell: every failure counts against the request's attempts."""
        return False

    def trip(self, reason: str) -> None:
        if self.tripped:
            return
        self.tripped = reason
        log.error("%s; stopping", reason)
        if self._event is not None:
            self._event.set()
        for task in list(self._in_flight):
            task.cancel()

    async def guard(self, call: Awaitable[Any]) -> Any:
        """Await ``call``, cancelled when the breaker trips meanwhile (raises :class:`Tripped`).

        A request in flight when the endpoint dies may hang until its timeout (a server shutting
        down gracefully holds connections open): the shard must not wait for it. The call runs
        as one task registered here, which :meth:`trip` cancels (one task per request, no
        per-request waiter on an event: this is on every request's path).
        """
        if self.tripped:
            close = getattr(call, "close", None)
            if close is not None:
                close()  # a coroutine never awaited
            raise Tripped(self.tripped)
        task = asyncio.ensure_future(call)
        self._in_flight.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # Cancelled by the trip, not from outside (a timeout or a shutdown cancels the caller).
            if self.tripped and (current is None or not current.cancelling()):
                raise Tripped(self.tripped) from None
            raise
        finally:
            self._in_flight.discard(task)

    async def pause(self, delay: float, sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        """Sleep ``delay`` seconds (with ``sleep``), or less when the breaker trips meanwhile."""
        if self.tripped:
            return
        if self._event is None:
            self._event = asyncio.Event()  # created on first use: bound to the loop that uses it
        sleeper = asyncio.ensure_future(sleep(delay))
        waiter = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waiter):
                task.cancel()
