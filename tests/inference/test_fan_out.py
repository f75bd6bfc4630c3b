"""The request processor's fan-out: the first failure is raised, the rest cancelled and retrieved."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from octomed_data.inference.processor import RequestProcessor


class LeaseGone(Exception):
    pass


def run_collecting_loop_errors(coro_factory) -> tuple[BaseException | None, list[dict]]:
    """Run a coroutine on a fresh loop; what it raised and what the loop's exception handler got
    (asyncio reports an unretrieved task exception there when the task is collected)."""
    reported: list[dict] = []
    raised: BaseException | None = None
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        loop.run_until_complete(coro_factory())
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        raised = exc
        exc.__traceback__ = None  # its frames would keep the failed tasks alive past gc.collect()
    finally:
        loop.close()
    gc.collect()
    return raised, reported


def test_tasks_failing_together_are_all_retrieved_and_one_error_is_raised() -> None:
    """A lost lease fails every in-flight write at once: one error, and no "Task exception was never
    retrieved" for the others."""
    proc = RequestProcessor({})
    started: list[int] = []

    async def work(i: int) -> None:
        started.append(i)
        await asyncio.sleep(0.05)
        raise LeaseGone(f"shard lease lost ({i})")

    async def main() -> None:
        await proc.fan_out((work(i) for i in range(6)), limit=6)

    raised, reported = run_collecting_loop_errors(main)
    assert isinstance(raised, LeaseGone)
    assert sorted(started) == list(range(6))
    assert [c.get("message") for c in reported] == []


def test_a_failure_cancels_the_slow_tasks_and_waits_for_them_to_unwind() -> None:
    proc = RequestProcessor({})
    unwound: list[int] = []

    async def slow(i: int) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            unwound.append(i)

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise LeaseGone("lost")

    async def main() -> None:
        await proc.fan_out([slow(0), slow(1), fails()], limit=3)

    t0 = time.monotonic()
    raised, reported = run_collecting_loop_errors(main)
    assert time.monotonic() - t0 < 15  # did not wait out the slow works' 30 s
    assert isinstance(raised, LeaseGone)
    assert sorted(unwound) == [0, 1]  # cancelled and unwound before fan_out returned
    assert reported == []


@pytest.mark.parametrize("limit", [1, 2, 8])
def test_every_work_runs_once_under_the_queue_bound(limit: int) -> None:
    proc = RequestProcessor({})
    done: list[int] = []
    peak = 0
    running = 0

    async def work(i: int) -> None:
        nonlocal peak, running
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1
        done.append(i)

    async def main() -> None:
        await proc.fan_out((work(i) for i in range(20)), limit=limit)

    raised, reported = run_collecting_loop_errors(main)
    assert raised is None and reported == []
    assert sorted(done) == list(range(20)) and peak <= limit
