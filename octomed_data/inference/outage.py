"""The per-teacher outage budget: a shard fails within minutes of a teacher going down.

:class:`~octomed_data.inference.retry.Breaker` trips after ``threshold`` distinct requests failed in
a row. That counts requests, so a shard with few requests in flight (or one long retry loop) can
spend every backed-off attempt of every sample before it trips. :class:`OutageBreaker` adds a
clock: once the teacher has failed at the connection level (refused, reset, timeout, 5xx) for
``budget_s`` seconds with no reply in between, it trips with one line naming the teacher and the
last server error, and every request of the shard stops (requests sleeping in a backoff or hung
in flight wake at once). Retries are logged (at most one line per ``log_every_s``) so a run in an
outage does not look frozen.

The budget comes from the teacher's ``outage_budget_s`` when it has one, else
:data:`DEFAULT_OUTAGE_BUDGET_S`. :func:`install_outage_budget` puts it on an endpoint client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from octomed_data.inference.retry import BREAKER_THRESHOLD, Breaker, Failure, log

DEFAULT_OUTAGE_BUDGET_S = 120.0
LOG_EVERY_S = 5.0


class OutageBreaker(Breaker):
    """A :class:`Breaker` that also trips after ``budget_s`` seconds of consecutive failures."""

    def __init__(
        self,
        name: str,
        url: str,
        threshold: int = BREAKER_THRESHOLD,
        clock: Callable[[], float] = time.monotonic,
        *,
        budget_s: float = DEFAULT_OUTAGE_BUDGET_S,
        log_every_s: float = LOG_EVERY_S,
    ) -> None:
        super().__init__(name, url, threshold, clock)
        self.budget_s = budget_s
        self.log_every_s = log_every_s
        self.outage_since: float | None = None  # first failure with no reply since
        self.outage_failures = 0
        self.last_server_error: str | None = None
        self._outage_token = 0
        self._logged_at = float("-inf")
        self._unlogged = 0

    def replied(self) -> None:
        super().replied()
        self.outage_since = None
        self.outage_failures = 0
        self._outage_token += 1  # a pending budget check belongs to an outage that ended

    def failed(self, request: int, failure: Failure, error: str) -> None:
        if not failure.outage:
            super().failed(request, failure, error)
            return
        now = self.clock()
        if self.outage_since is None:
            self.outage_since = now
            self._arm(self._outage_token)
        self.outage_failures += 1
        self.last_server_error = error
        super().failed(request, failure, error)
        self._log_retry(now, error)
        if now - self.outage_since >= self.budget_s:
            self._spent(now)

    def _log_retry(self, now: float, error: str) -> None:
        if self.tripped:
            return
        if now - self._logged_at < self.log_every_s:
            self._unlogged += 1
            return
        more = f" (+{self._unlogged} more failed attempts)" if self._unlogged else ""
        log.warning(
            "teacher %r at %s: attempt failed: %s%s; retrying with backoff, %.0f of %.0f s outage budget spent",
            self.name,
            self.url,
            error,
            more,
            now - (self.outage_since or now),
            self.budget_s,
        )
        self._logged_at = now
        self._unlogged = 0

    def _arm(self, token: int) -> None:
        """Check again when the budget runs out, even if no attempt fails then (all asleep or hung)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): checked on the next failure
        loop.call_later(max(0.0, self.budget_s), self._deadline, token)

    def _deadline(self, token: int) -> None:
        if token == self._outage_token and self.outage_since is not None:
            self._spent(self.clock())

    def _spent(self, now: float) -> None:
        span = now - (self.outage_since or now)
        self.trip(
            f"teacher {self.name!r} at {self.url}: outage budget of {self.budget_s:.0f} s spent "
            f"({self.outage_failures} consecutive failed attempts over {span:.1f} s, no reply); "
            f"last server error: {self.last_server_error}"
        )


def outage_budget_s(teacher: Any) -> float:
    """The teacher's outage budget in seconds (``outage_budget_s`` on its config, else the default)."""
    value = getattr(teacher, "outage_budget_s", None)
    return float(value) if value else DEFAULT_OUTAGE_BUDGET_S


def install_outage_budget(client: Any, budget_s: float | None = None) -> Any:
    """Give an endpoint client an :class:`OutageBreaker` (same name, URL and threshold); returns it."""
    old = client.breaker
    if isinstance(old, OutageBreaker) and budget_s is None:
        return client
    client.breaker = OutageBreaker(
        old.name,
        old.url,
        old.threshold,
        old.clock,
        budget_s=budget_s if budget_s is not None else outage_budget_s(client.teacher),
    )
    return client
