"""Requests- and tokens-per-window budgets per teacher.

The core, :class:`WindowBudget`, is plain synchronous bookkeeping with the clock passed in, so
the same code runs in-process (:class:`LocalRateLimiter`) and inside the Ray actor that holds
a teacher's global budget for every machine (``tasks/ray_executor.py``), which hands permits out
in small leases through :class:`LeasedRateLimiter`.

Requests are counted in a sliding window (a log of grant times), so that *no* window of
``window_s`` seconds at the server sees more than ``rpm`` requests; a token bucket keeps tokens
per window, charged with an estimate up front and corrected with the real usage afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol


class RateLimiter(Protocol):
    """What the engine needs from a limiter."""

    async def acquire(self, teacher: str, tokens: int) -> None:
        """Wait until one request of about ``tokens`` tokens may be sent to ``teacher``."""

    def record_usage(self, teacher: str, reserved: int, used: int) -> None:
        """Correct the token budget once the real usage of a request is known."""


def safety_margin(window_s: float) -> float:
    """Extra spacing so client-side scheduling jitter can't push the *server's* window over."""
    return min(max(0.1, 0.02 * window_s), 0.5 * window_s)


class WindowBudget:
    """Sliding-window request log plus a token bucket, for one teacher."""

    def __init__(
        self, rpm: int | None, tpm: int | None, window_s: float = 60.0, margin_s: float | None = None
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_s + (safety_margin(window_s) if margin_s is None else margin_s)
        self._grants: deque[float] = deque()
        self._tokens = float(tpm) if tpm else 0.0
        self._tokens_at: float | None = None  # first take() sets the clock (callers pass `now`)

    def _refill(self, now: float) -> None:
        if self.tpm and self._tokens_at is not None:
            rate = self.tpm / self.window_s
            self._tokens = min(float(self.tpm), self._tokens + max(0.0, now - self._tokens_at) * rate)
        self._tokens_at = now

    def take(self, n: int, tokens_each: int, now: float) -> tuple[int, float]:
        """Grant up to ``n`` requests now; returns (granted, seconds to wait when none was)."""
        if self.rpm is None and self.tpm is None:
            return n, 0.0
        granted = n
        wait = 0.0
        if self.rpm is not None:
            while self._grants and now - self._grants[0] >= self.window_s:
                self._grants.popleft()
            granted = min(granted, self.rpm - len(self._grants))
            if granted <= 0:
                wait = self._grants[0] + self.window_s - now
        if self.tpm is not None and granted > 0:
            self._refill(now)
            # A request larger than the whole bucket may go once the bucket is full.
            need = min(float(tokens_each), float(self.tpm))
            affordable = int(self._tokens // need) if need > 0 else granted
            if affordable <= 0:
                wait = max(wait, (need - self._tokens) * self.window_s / self.tpm)
            granted = min(granted, affordable)
            if granted > 0:
                self._tokens -= granted * tokens_each
        if granted <= 0:
            return 0, max(wait, 0.001)
        if self.rpm is not None:
            self._grants.extend([now] * granted)
        return granted, 0.0

    def correct(self, delta_tokens: int) -> None:
        """Charge (or refund) the difference between used and reserved tokens."""
        if self.tpm is not None:
            self._tokens -= delta_tokens


class LocalRateLimiter:
    """In-process limiter: one :class:`WindowBudget` per teacher, FIFO waiters."""

    def __init__(self, budgets: Mapping[str, WindowBudget]) -> None:
        self._budgets = dict(budgets)
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def for_teachers(cls, teachers) -> LocalRateLimiter:
        return cls({t.name: WindowBudget(t.rpm, t.tpm, t.rate_window_s) for t in teachers})

    async def acquire(self, teacher: str, tokens: int) -> None:
        budget = self._budgets.get(teacher)
        if budget is None or (budget.rpm is None and budget.tpm is None):
            return
        # One waiter polls at a time, the rest queue on the lock: no thundering herd.
        lock = self._locks.setdefault(teacher, asyncio.Lock())
        async with lock:
            while True:
                granted, wait = budget.take(1, tokens, time.monotonic())
                if granted:
                    return
                await asyncio.sleep(wait)

    def record_usage(self, teacher: str, reserved: int, used: int) -> None:
        budget = self._budgets.get(teacher)
        if budget is not None:
            budget.correct(used - reserved)


LeaseFn = Callable[[str, int, int, int], Awaitable[tuple[int, float]]]


class LeasedRateLimiter:
    """Client side of a shared budget: leases permits in small chunks that expire after ``ttl_s``.

    ``lease(teacher, n, tokens_each, token_correction)`` asks the holder of the global budget for up
    to ``n`` permits and returns (granted, wait). The holder counts a permit against the window
    as of its grant time and is configured with ``ttl_s`` of extra margin, so a permit spent
    any time before it expires still keeps the server's window within budget.
    """

    def __init__(
        self, lease: LeaseFn, chunks: Mapping[str, int], ttl_s: float = 0.5, unlimited: set[str] | None = None
    ) -> None:
        self._lease = lease
        self._chunks = dict(chunks)
        self._ttl = ttl_s
        self._unlimited = set(unlimited or ())
        self._permits: dict[str, deque[float]] = {}
        self._corrections: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def acquire(self, teacher: str, tokens: int) -> None:
        if teacher in self._unlimited:
            return
        permits = self._permits.setdefault(teacher, deque())
        lock = self._locks.setdefault(teacher, asyncio.Lock())
        async with lock:
            while True:
                now = time.monotonic()
                while permits and permits[0] <= now:
                    permits.popleft()  # expired unused: spending it now could break the window
                if permits:
                    permits.popleft()
                    return
                correction = self._corrections.pop(teacher, 0)
                # The holder stamps a grant some time after this; the TTL counts from *before*
                # the call, so a slow lease round trip can't stretch a permit past its margin.
                asked = time.monotonic()
                granted, wait = await self._lease(teacher, self._chunks.get(teacher, 1), tokens, correction)
                if granted:
                    expiry = asked + self._ttl
                    permits.extend([expiry] * granted)
                    continue
                await asyncio.sleep(wait)

    def record_usage(self, teacher: str, reserved: int, used: int) -> None:
        if teacher not in self._unlimited:
            self._corrections[teacher] = self._corrections.get(teacher, 0) + used - reserved


def lease_chunk(rpm: int | None, window_s: float, ttl_s: float) -> int:
    """Permits per lease: about what one client spends within a lease's lifetime, at most 32."""
    if rpm is None:
        return 32
    per_ttl = rpm / window_s * ttl_s
    return max(1, min(32, int(per_ttl)))
