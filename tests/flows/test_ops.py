"""Issue 16 (operate it for real), the parts that need no server: the outage budget, leases (one
writer per shard, one trainer per checkpoint folder), the shard table's total time, training
exactly once per (run, export), and the train deployment refusing a run without an export."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from octomed_data import storage
from octomed_data.inference.client import EndpointClient, request_with_retries
from octomed_data.inference.outage import OutageBreaker, install_outage_budget
from octomed_data.inference.ratelimit import LocalRateLimiter
from octomed_data.inference.retry import Backoff, Breaker
from octomed_data.layout import RunPaths
from octomed_data.report import shard_table_rows
from octomed_data.runs import Lease, LeaseHeld, record_shard, shard_lease, shard_states
from octomed_data.teachers import TeacherConfig

CLOSED = "http://127.0.0.1:9/v1"  # discard port: connection refused


def _one_request_retrying(client: EndpointClient, attempts: int) -> tuple:
    teacher = client.teacher
    limiter = LocalRateLimiter.for_teachers([teacher])
    kwargs = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    async def main() -> tuple:
        try:
            return await request_with_retries(
                client,
                kwargs,
                max_attempts=attempts,
                limiter=limiter,
                estimate=10,
                backoff=Backoff(0.05, 0.2),
            )
        finally:
            await client.close()

    return asyncio.run(main())


def test_outage_budget_fails_a_lone_retrying_request_in_time_naming_teacher_and_error() -> None:
    """Defect 4: the request-counting breaker never trips on one request retried for ever (a shard
    with few requests in flight spent every backed-off attempt); the outage budget does, in time."""
    teacher = TeacherConfig(name="t1", base_url=CLOSED, model="m", server="openai", timeout_s=5)
    plain = EndpointClient(teacher, SecretStr("sk-test-0000000000002"))
    assert type(plain.breaker) is Breaker
    _one_request_retrying(plain, 8)
    assert plain.breaker.tripped is None  # 8 failed attempts of one request: no trip, no message

    client = install_outage_budget(EndpointClient(teacher, SecretStr("sk-test-0000000000002")), budget_s=1.0)
    assert isinstance(client.breaker, OutageBreaker)
    started = time.monotonic()
    response, attempts, _, last_error = _one_request_retrying(client, 10_000)
    took = time.monotonic() - started
    assert response is None and took < 5, took
    line = client.breaker.tripped
    assert line and "\n" not in line
    assert "teacher 't1'" in line and "outage budget of 1 s spent" in line
    assert "last server error: connection error" in line
    assert "sk-test-0000000000002" not in line


def test_outage_budget_wakes_requests_asleep_in_backoff_and_resets_on_a_reply() -> None:
    now = [0.0]
    b = OutageBreaker("t", "u", threshold=100, clock=lambda: now[0], budget_s=10.0)
    from octomed_data.inference.retry import Failure

    down = Failure("connection error: refused", retryable=True, outage=True)
    b.failed(1, down, "connection error: refused")
    now[0] = 9.0
    b.failed(1, down, "connection error: refused")
    assert b.tripped is None
    b.succeeded()  # the teacher answered: the budget starts over
    now[0] = 15.0
    b.failed(2, down, "connection error: refused")
    assert b.tripped is None and b.outage_since == 15.0

    async def asleep() -> float:
        fast = OutageBreaker("t", "u", threshold=100, budget_s=0.3)
        fast.failed(1, down, "HTTP 503: upstream down")
        t0 = time.monotonic()
        await fast.pause(30.0)  # a long backoff: woken when the budget runs out
        assert fast.tripped and "HTTP 503: upstream down" in fast.tripped
        return time.monotonic() - t0

    assert asyncio.run(asleep()) < 2


def test_retries_are_logged_at_most_every_few_seconds(caplog) -> None:
    from octomed_data.inference.retry import Failure

    now = [0.0]
    b = OutageBreaker("t", "u", threshold=1000, clock=lambda: now[0], budget_s=100.0, log_every_s=5.0)
    down = Failure("connection error", retryable=True, outage=True)
    with caplog.at_level("WARNING", logger="octomed_data.inference"):
        for i in range(100):
            now[0] = i * 0.1
            b.failed(i % 3, down, "connection error")
    lines = [r.getMessage() for r in caplog.records if "outage budget spent" in r.getMessage()]
    assert 2 <= len(lines) <= 3 and "retrying with backoff" in lines[0]


# ------------------------------------------------------------------------------------------ leases
def test_lease_one_holder_expiry_takeover_and_lost_detection(tmp_path: Path) -> None:
    uri = str(tmp_path / "state" / "distill" / "00001.lease")
    a = Lease(uri, "a", ttl_s=0.6, settle_s=0)
    b = Lease(uri, "b", ttl_s=0.6, settle_s=0)
    assert a.try_acquire() and a.held()
    assert not b.try_acquire()
    with pytest.raises(LeaseHeld, match="held by 'a'"):
        b.acquire(wait_s=0.1, poll_s=0.05)
    time.sleep(0.7)  # a died: its lease expires and b takes over
    assert b.try_acquire() and b.held()
    assert not a.held() and a.renew() is False  # a leftover writer learns it lost the shard
    b.release()
    assert not Path(uri).exists()


def test_lease_race_has_one_winner(tmp_path: Path) -> None:
    uri = str(tmp_path / "x.lease")
    wins = []

    def take(owner: str) -> None:
        if Lease(uri, owner, ttl_s=5, settle_s=0.05).try_acquire():
            wins.append(owner)

    threads = [threading.Thread(target=take, args=(f"o{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_lease_hold_heartbeat_keeps_it_and_reports_a_takeover(tmp_path: Path) -> None:
    uri = str(tmp_path / "y.lease")
    lost = threading.Event()
    lease = Lease(uri, "me", ttl_s=0.3, settle_s=0)
    with lease.hold(on_lost=lost.set):
        time.sleep(0.7)  # longer than the TTL: the heartbeat renewed it
        assert lease.held()
        storage.write_json(uri, {"owner": "thief", "expires_at": time.time() + 60})
        assert lost.wait(2)
    assert json.loads(Path(uri).read_text())["owner"] == "thief"  # release leaves a foreign lease


# ------------------------------------------------------------------------------- shard table time
def test_shard_table_shows_time_over_every_attempt_and_error_early(tmp_path: Path) -> None:
    """Defect 4 (second half): the table showed only the last attempt's seconds."""
    paths = RunPaths(str(tmp_path), "r")
    record_shard(paths, "distill", "00000", "RUNNING", attempt=1)
    record_shard(paths, "distill", "00000", "FAILED", attempt=1, seconds=40.0, error="boom")
    record_shard(paths, "distill", "00000", "RUNNING", attempt=2)
    # attempt 2 died without saying how long it ran (the task's own recorder): counted from RUNNING
    doc = storage.read_json(paths.state_uri("distill", "00000"))
    doc["updated_at"] = "2000-01-01T00:00:00+00:00"
    storage.write_json(paths.state_uri("distill", "00000"), doc)
    rec = record_shard(paths, "distill", "00000", "FAILED", attempt=2, error="boom again")
    assert rec["seconds"] > 1e8 and rec["previous_seconds"] == 40.0
    storage.write_json(paths.state_uri("distill", "00000"), rec | {"seconds": 10.0, "total_seconds": 50.0})
    record_shard(paths, "distill", "00000", "RUNNING", attempt=3)
    record_shard(paths, "distill", "00000", "COMPLETED", attempt=3, seconds=5.0, samples=4)
    (row,) = shard_table_rows(shard_states(paths, "distill"))
    assert row["seconds"] == 55.0 and row["attempt"] == 3 and row["samples"] == 4
    assert list(row)[:4] == ["stage", "shard", "state", "error"]
    # a fresh pass (attempt 1 again) starts over
    record_shard(paths, "distill", "00000", "RUNNING", attempt=1)
    rec = record_shard(paths, "distill", "00000", "COMPLETED", attempt=1, seconds=2.0)
    assert rec["total_seconds"] == 2.0


def test_shard_lease_lives_next_to_the_attempt_record_and_is_not_a_record(tmp_path: Path) -> None:
    paths = RunPaths(str(tmp_path), "r")
    lease = shard_lease(paths, "distill", "00003", "me")
    assert lease.uri == storage.join(paths.state_dir("distill"), "00003.lease")
    assert lease.try_acquire()
    assert shard_states(paths, "distill") == []
