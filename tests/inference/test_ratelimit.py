"""Requests- and tokens-per-window budgets (:mod:`octomed_data.inference.ratelimit`)."""

from __future__ import annotations

import asyncio
import random

import pytest

from octomed_data.inference.ratelimit import LeasedRateLimiter, WindowBudget, lease_chunk
from octomed_data.sandbox import max_in_window


def test_window_budget_never_exceeds_rpm_in_any_window() -> None:
    budget = WindowBudget(rpm=7, tpm=None, window_s=1.0, margin_s=0.0)
    rng = random.Random(0)
    now, grants = 0.0, []
    while len(grants) < 200:
        granted, wait = budget.take(rng.randint(1, 3), 10, now)
        grants.extend([now] * granted)
        now += wait if not granted else rng.random() * 0.05
    assert max_in_window(grants, 1.0) == 7
    # Throughput is the budget, not less: 200 grants need about 200 / 7 windows.
    assert grants[-1] == pytest.approx(200 / 7, abs=1.5)


def test_window_budget_tokens_with_post_hoc_correction() -> None:
    budget = WindowBudget(rpm=None, tpm=1000, window_s=10.0, margin_s=0.0)
    assert budget.take(1, 600, 0.0)[0] == 1
    granted, wait = budget.take(1, 600, 0.0)
    assert granted == 0 and wait == pytest.approx(2.0, abs=0.01)  # 200 tokens short at 100 tokens/s
    budget.correct(100 - 600)  # the request used 100 tokens, not the 600 reserved
    assert budget.take(1, 600, 0.0)[0] == 1


def test_lease_chunks_scale_with_rate() -> None:
    assert lease_chunk(None, 60, 0.5) == 32
    assert lease_chunk(60, 60, 0.5) == 1
    assert lease_chunk(60_000, 60, 0.5) == 32


def test_leased_permit_lifetime_counts_from_before_a_slow_lease_call() -> None:
    """A permit granted by the budget holder must expire TTL after the grant at the latest.

    The holder counts the permit at its grant time; a lease reply that is slow to arrive must
    not extend the permit's life beyond the window margin the holder reserved for it.
    """
    calls: list[float] = []

    async def slow_lease(teacher: str, n: int, tokens: int, correction: int) -> tuple[int, float]:
        calls.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.3)  # the grant is stamped at the start; the reply is slow
        return n, 0.0

    async def scenario() -> int:
        limiter = LeasedRateLimiter(slow_lease, {"t": 4}, ttl_s=0.4)
        await limiter.acquire("t", 10)  # ~0.3 s: leased 4, spent 1
        await asyncio.sleep(0.15)  # now ~0.45 s after asking: the 3 left are past their TTL
        await limiter.acquire("t", 10)
        return len(calls)

    assert asyncio.run(scenario()) == 2
