"""THE inference client: error classification, key scrubbing, request fields, backoff, breaker.

The breaker's outage rule is pinned end to end: a teacher that answers, then goes down mid-run,
fails the shard once its outage budget is spent (not after every sample's backed-off attempts,
not before the budget), and what succeeded stays. tests/inference/test_outage.py pins the rest
of the rule (restart, hung, refused, slow) against loopback teachers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from octomed_data.distill.engine import distill_shard
from octomed_data.inference.client import (
    EndpointClient,
    TeacherUnreachable,
    classify,
    request_with_retries,
    scrub,
)
from octomed_data.inference.ratelimit import LocalRateLimiter
from octomed_data.inference.retry import Backoff, Breaker, Failure, parse_retry_after
from octomed_data.sandbox import LLAMACPP_TOP_K_ERROR, FaultConfig, start_sandbox
from octomed_data.teachers import TeacherConfig
from tests.support.distill import config, make_questions, read_raw
from tests.support.inference import recorded


def _status_error(recorded_body: dict, status: int):
    import httpx
    import openai

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    response = httpx.Response(status, json=recorded_body, request=request)
    cls = openai.BadRequestError if status == 400 else openai.InternalServerError
    return cls(f"Error code: {status} - {recorded_body}", response=response, body=recorded_body)


def test_server_errors_keep_the_whole_message_on_one_line() -> None:
    vllm400 = recorded("vllm-0.32-cpu_http400_max_tokens.json")
    failure = classify(_status_error(vllm400["body"], 400))
    assert not failure.retryable and "\n" not in str(failure)
    assert "max_tokens=999999 cannot be greater than max_model_len=2048" in str(failure)
    # llama-cpp-python's 500 for top_k=-1: the cause is on the lines after the first.
    body = {"error": {"message": LLAMACPP_TOP_K_ERROR, "type": "internal_server_error"}}
    failure = classify(_status_error(body, 500))
    assert (
        "\n" not in str(failure) and "greater than or equal to 0" in str(failure) and "top_k" in str(failure)
    )
    assert len(str(classify(_status_error({"error": {"message": "x" * 5000}}, 500)))) <= 620


def test_scrub_replaces_only_key_shaped_text() -> None:
    assert scrub("bad max_tokens for key ma", ["ma"]) == "bad max_tokens for key ***"
    assert scrub("auth failed for sk-live-abcdef123456", ["sk-live-abcdef123456"]) == "auth failed for ***"
    assert "abcdefghij12" not in scrub("Bearer abcdefghij12 rejected", ["abcdefghij12"])
    assert scrub("key-shaped api_0123456789ab leaks", []) == "key-shaped *** leaks"
    assert scrub("set api_key_env to the variable", []) == "set api_key_env to the variable"
    # Issue 25: the other spellings of a key in an error text (URL-encoded, base64) go too.
    import base64
    import urllib.parse

    key = "sk-live-abcdef123456"
    text = (
        f"GET /v1?k={urllib.parse.quote(key, safe='')} auth={base64.b64encode(key.encode()).decode()} failed"
    )
    clean = scrub(text, [key])
    assert urllib.parse.quote(key, safe="") not in clean and "c2stbGl2ZS1" not in clean and "failed" in clean


def test_request_fields_follow_the_server_kind_and_seed_policy() -> None:
    def client(kind: str, **over) -> EndpointClient:
        t = TeacherConfig(name="t", base_url="http://127.0.0.1:9/v1", model="m", server=kind, **over)
        return EndpointClient(t, SecretStr("k"))

    assert client("vllm").request_fields(7, 4) == {
        "seed": 7, "n": 4, "extra_body": {"top_k": -1, "repetition_penalty": 1.0}
    }  # fmt: skip
    assert client("llamacpp").request_fields(7, 1) == {
        "seed": 7,
        "extra_body": {"top_k": 0, "repeat_penalty": 1.0},
    }
    assert client("openai").request_fields(7, 1) == {"seed": 7}
    assert client("vllm", seed_policy="off").request_fields(7, 1)["extra_body"]["top_k"] == -1
    assert "seed" not in client("vllm", seed_policy="off").request_fields(7, 1)
    assert client("vllm", extra_body={"top_k": 20}).request_fields(None, 1) == {
        "extra_body": {"top_k": 20, "repetition_penalty": 1.0}
    }
    assert (
        client("vllm").supports_n and not client("llamacpp").supports_n and not client("generic").supports_n
    )
    assert not client("vllm", supports_n=False).supports_n and client("generic", supports_n=True).supports_n


def test_breaker_message_counts_the_attempts_really_made(tmp_path: Path, monkeypatch) -> None:
    """HTTP 400 is not retried: the breaker says "after 1 attempt", not "after 6 attempts each"."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-breaker-0000000001")
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 12)
    with start_sandbox(faults=FaultConfig(seed=0, bad_request=1.0)) as sb:
        # One request in flight: every counted attempt has reached the server before the breaker
        # trips (none is cancelled on its way), so the two counts are equal whatever the load.
        report = distill_shard(
            q_uri, "00000", out, config(sb.base_url, max_attempts=6, teacher={"max_in_flight": 1})
        )
        requests = sb.stats()["requests"]
    assert (
        report.aborted
        and "(the last after 1 attempt)" in report.aborted
        and "none succeeded" in report.aborted
    )
    assert "HTTP 400" in report.aborted and "bad request (sandbox)" in report.aborted
    assert requests == report.requests and report.retries == 0


def test_failures_say_whether_the_endpoint_itself_may_be_down() -> None:
    import httpx
    import openai

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    refused = openai.APIConnectionError(request=request)
    refused.__cause__ = httpx.ConnectError("refused")
    assert classify(refused).outage and classify(refused).retryable
    assert "ConnectError" in str(classify(refused))
    assert classify(openai.APITimeoutError(request=request)).outage
    assert classify(TimeoutError()).outage
    assert classify(_status_error({"error": {"message": "down"}}, 500)).outage
    # The server answered: not an outage (400 is not retried, a malformed 200 is).
    assert not classify(_status_error({"error": {"message": "bad"}}, 400)).outage
    assert not classify(ValueError("response has no choices")).outage
    limited = openai.RateLimitError(
        "slow down",
        response=httpx.Response(429, headers={"retry-after": "2"}, request=request),
        body=None,
    )
    assert classify(limited).delay == 2.0 and not classify(limited).outage


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert (
        parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=lambda: 1445412480.0) == 10.0
    )
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_one_backoff_exponential_capped_jittered_and_retry_after_wins() -> None:
    b = Backoff(base_s=1.0, max_s=8.0)
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)):
        delays = [b(attempt, None) for _ in range(200)]
        assert all(0.5 * base <= d <= 1.5 * base for d in delays)
        assert max(delays) - min(delays) > 0.1 * base  # jittered: synchronised retries spread
    assert all(30.0 <= b(1, 30.0) <= 33.0 for _ in range(50))  # Retry-After is not capped


def _outage() -> Failure:
    return Failure("connection error (ConnectError)", True, outage=True)


def test_breaker_trips_on_an_outage_after_successes(caplog) -> None:
    now = [100.0]
    br = Breaker("t", "http://x/v1", threshold=4, clock=lambda: now[0])
    for _ in range(50):
        br.succeeded()
    # One request retried over and over is not an outage (a poisoned prompt)...
    for _ in range(10):
        br.failed(1, _outage(), "connection error (ConnectError)")
    assert br.tripped is None
    # ... and a reply from the server in between resets the count.
    br.failed(2, _outage(), "e")
    br.failed(3, _outage(), "e")
    br.failed(4, Failure("HTTP 400: bad", False), "HTTP 400: bad")
    assert br.tripped is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="octomed_data.inference"):
        for rid in range(10, 14):
            now[0] += 0.5
            br.failed(rid, _outage(), "connection error (ConnectError)")
    assert br.tripped == (
        "teacher 't' at http://x/v1 unreachable: connection error (ConnectError); 50 requests had succeeded, "
        "the last 2.0 s ago (4 consecutive failures over 1.5 s)"
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "teacher 't' at http://x/v1: 2 requests failed in a row over 0.5 s (connection error (ConnectError)); "
        "retrying, stopping at 4"
    ]


def test_breaker_never_worked_rule_and_outage_without_success() -> None:
    br = Breaker("m", "http://x/v1", threshold=3)
    for _ in range(3):
        br.failed(0, Failure("HTTP 400: nope", False), "HTTP 400: nope")
        br.request_gave_up(1, "HTTP 400: nope")
    assert (
        br.tripped is not None
        and "3 samples failed (the last after 1 attempt) and none succeeded" in br.tripped
    )
    br = Breaker("m", "http://x/v1", threshold=3)
    for rid in range(3):
        br.failed(rid, _outage(), "request timed out")
    assert br.tripped is not None and br.tripped.startswith(
        "teacher 'm' at http://x/v1 unreachable: request timed out"
    )
    assert "none succeeded (3 consecutive failures over" in br.tripped
    # Once it has worked, given-up requests alone never trip it (the outage rule does).
    br = Breaker("m", "http://x/v1", threshold=2)
    br.succeeded()
    for _ in range(5):
        br.request_gave_up(6, "HTTP 400: nope")
    assert br.tripped is None


def test_a_tripped_breaker_wakes_requests_sleeping_in_backoff() -> None:
    async def main() -> float:
        br = Breaker("t", "http://x/v1", threshold=1)
        started = time.monotonic()
        sleeper = asyncio.create_task(br.pause(60.0))
        await asyncio.sleep(0.05)
        br.trip("down")
        await asyncio.wait_for(sleeper, 5)
        return time.monotonic() - started

    assert asyncio.run(main()) < 2.0


def test_a_tripped_breaker_cancels_requests_in_flight() -> None:
    """A request hanging on a dying server (graceful shutdown holds connections) stops at the trip."""
    from octomed_data.inference.retry import Tripped

    async def main() -> tuple[float, bool]:
        br = Breaker("t", "http://x/v1", threshold=1)
        hanging = asyncio.ensure_future(asyncio.sleep(60))
        started = time.monotonic()
        guarded = asyncio.create_task(br.guard(hanging))
        await asyncio.sleep(0.05)
        br.trip("down")
        with pytest.raises(Tripped):
            await asyncio.wait_for(guarded, 5)
        await asyncio.sleep(0)
        return time.monotonic() - started, hanging.cancelled()

    elapsed, cancelled = asyncio.run(main())
    assert elapsed < 2.0 and cancelled


def test_request_with_retries_stops_every_request_once_the_endpoint_is_dead() -> None:
    """The module-level loop (what evaluation uses) feeds and obeys the client's breaker.

    Issue 24: the outage rule is time, not a count: 12 requests refused over and over are retried
    for the teacher's outage budget (here 2 s), then all stop at once."""
    teacher = TeacherConfig(
        name="t",
        base_url="http://127.0.0.1:9/v1",
        model="m",
        server="openai",
        timeout_s=5,
        outage_budget_s=2.0,
    )

    client = EndpointClient(teacher, SecretStr("sk-test-0000000000001"), breaker_threshold=4)
    limiter = LocalRateLimiter.for_teachers([teacher])
    kwargs = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    async def main() -> list[tuple]:
        try:
            first = await asyncio.gather(
                *(
                    request_with_retries(client, kwargs, max_attempts=6, limiter=limiter, estimate=10)
                    for _ in range(12)
                )
            )
            # A request sent after the trip is not sent at all: it returns the reason.
            later = await request_with_retries(client, kwargs, max_attempts=6, limiter=limiter, estimate=10)
            return [*first, later]
        finally:
            await client.close()

    started = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - started
    # Retried for the budget (not failed at once), stopped right after it: not 12 requests x 6
    # backed-off attempts (~30 s each).
    assert 2.0 <= elapsed < 10, elapsed
    line = client.breaker.tripped
    assert line and "unreachable (connection refused)" in line and "outage budget of 2 s spent" in line
    assert "last server error: connection error" in line and "\n" not in line
    # No request gave up on its own attempts: connection-level failures in an outage use none up.
    assert all(r[0] is None for r in results) and all(r[1] >= 2 for r in results[:-1])
    assert client.breaker.gave_up == 0
    assert results[-1][1] == 0 and results[-1][3] == client.breaker.tripped
    assert "sk-test-0000000000001" not in client.breaker.tripped


def _stop_after(sb, requests: int) -> threading.Thread:
    """Take the sandbox teacher down (its port closed) once it has answered ``requests`` requests."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sb.stats()["completed"] < requests:
            time.sleep(0.005)
        sb.stop()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_teacher_down_mid_run_fails_the_shard_in_seconds_and_keeps_what_succeeded(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """Issue 16 item 4: one success used to switch the breaker off for good, so an outage mid-run
    cost every sample all its backed-off attempts (minutes per shard, no log line)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-outage-00000000001")
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 60)
    # Production backoff (1 s base, 60 s cap, 6 attempts): without the breaker every one of the
    # ~200 samples left would spend 1+2+4+8+16 s backing off, 48 tasks at a time. Issue 24: the
    # outage rule is time, so the shard fails once the teacher's budget (here 3 s) is spent.
    with start_sandbox(latency_s=0.05) as sb:
        cfg = config(
            sb.base_url,
            backoff_base_s=1.0,
            backoff_max_s=60.0,
            max_attempts=6,
            teacher={"outage_budget_s": 3.0},
        )
        watcher = _stop_after(sb, 40)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="octomed_data.inference"):
            report = distill_shard(q_uri, "00000", out, cfg)
        elapsed = time.monotonic() - started
        watcher.join(10)
    print(f"time to fail: {elapsed:.2f} s; {report.stored} stored; aborted: {report.aborted}")
    assert 3.0 <= elapsed < 15, elapsed
    assert report.aborted and report.aborted.startswith("teacher 'sandbox' at ")
    assert "unreachable (connection refused)" in report.aborted
    assert "outage budget of 3 s spent" in report.aborted and "consecutive failed attempts" in report.aborted
    assert "requests had succeeded" in report.aborted and "\n" not in report.aborted
    assert any("outage budget spent" in r.getMessage() for r in caplog.records)
    assert not report.complete and 40 <= report.stored < report.expected == 240
    rows = read_raw(out)
    assert sum(r["reject_reason"] != "request_failed" for r in rows) == report.stored
    # The journal kept what succeeded: a re-run against a live teacher asks only for the rest.
    with start_sandbox() as sb2:
        again = distill_shard(q_uri, "00000", out, config(sb2.base_url))
        asked = sb2.stats()["requests"]
    assert again.complete and again.stored_before == report.stored and asked == 240 - report.stored


def test_teacher_unreachable_is_the_public_error() -> None:
    from octomed_data.distill import TeacherUnreachable as from_distill
    from octomed_data.errors import OctomedError

    assert from_distill is TeacherUnreachable and issubclass(TeacherUnreachable, OctomedError)


def test_every_endpoint_client_has_its_teachers_outage_budget() -> None:
    from pydantic import SecretStr

    from octomed_data.inference.client import EndpointClient
    from octomed_data.inference.outage import DEFAULT_OUTAGE_BUDGET_S, OutageBreaker
    from octomed_data.teachers import TeacherConfig

    base = {"name": "t", "base_url": "http://127.0.0.1:9/v1", "model": "m", "server": "generic"}
    default = EndpointClient(TeacherConfig(**base), SecretStr("sk-test-0000000000003"))
    tight = EndpointClient(TeacherConfig(**base, outage_budget_s=7.5), SecretStr("sk-test-0000000000003"))
    assert isinstance(default.breaker, OutageBreaker) and default.breaker.budget_s == DEFAULT_OUTAGE_BUDGET_S
    assert tight.breaker.budget_s == 7.5
