"""Teacher fleets: one teacher over several replicas (octomed_data.inference.fleet).

Router behaviour (least in-flight, ejection, failover, probe back) against real sandbox servers on
loopback, and end to end through the distillation engine with three replicas, one killed and
restarted on the same port mid-run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from pydantic import SecretStr

from cli import main
from octomed_data import storage
from octomed_data.distill.engine import distill_shard
from octomed_data.errors import ConfigError
from octomed_data.inference.client import EndpointClient, request_with_retries
from octomed_data.inference.fleet import FleetTransport, ReplicaDown, public_url, served_by
from octomed_data.inference.ratelimit import LocalRateLimiter
from octomed_data.inference.retry import Backoff
from octomed_data.inference.transport_http import HTTPTransport
from octomed_data.recipe import load_recipe
from octomed_data.sandbox import max_in_window, start_sandbox
from octomed_data.schema import SAMPLE_SCHEMA
from octomed_data.teachers import DistillConfig, TeacherConfig
from tests.support.distill import KEY, make_questions
from tests.support.net import free_port

SECRET = SecretStr(KEY)
MESSAGES = [{"role": "user", "content": "Question: which drug?\nA. Metformin\nB. Insulin"}]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"


def _fleet(urls: list[str], **kw) -> FleetTransport:
    return FleetTransport([(u, HTTPTransport(u, SECRET, 10.0)) for u in urls], **kw)


def _chat(fleet: FleetTransport, seed: int):
    return fleet.chat(model="m", messages=MESSAGES, seed=seed, max_tokens=64)


class Clock:
    """A clock the test moves: probe cooldowns pass when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------- configuration


def test_endpoints_only_config_and_old_configs_unchanged() -> None:
    urls = ["http://gpu-0:8000/v1", "http://gpu-1:8000/v1", "http://gpu-2:8000/v1"]
    fleet = TeacherConfig(name="r1", endpoints=urls, model="deepseek-r1")
    single = TeacherConfig(name="r1", base_url=urls[0], model="deepseek-r1")
    assert fleet.base_url == urls[0] and fleet.replica_urls() == urls
    assert single.endpoints == [] and single.replica_urls() == [urls[0]]
    # Same sample from any replica: endpoints change no sample key or config fingerprint.
    assert fleet.params_hash() == single.params_hash()
    assert TeacherConfig(name="r1", base_url=urls[1], endpoints=urls, model="deepseek-r1").base_url == urls[1]
    for bad, message in (
        ({"base_url": "http://elsewhere/v1", "endpoints": urls}, "base_url must be one of its endpoints"),
        ({"endpoints": [urls[0], urls[0] + "/"]}, "duplicate endpoints"),
        ({"endpoints": urls, "replica_probe_s": 10, "replica_probe_max_s": 1}, "replica_probe_max_s"),
    ):
        with pytest.raises(ConfigError, match=message):
            DistillConfig.parse({"teachers": [{"name": "r1", "model": "m", **bad}]})


def test_recipe_teacher_with_endpoints_only_is_not_the_sandbox() -> None:
    urls = ["http://gpu-0:8000/v1", "http://gpu-1:8000/v1"]
    recipe = load_recipe("demo", {"teachers": [{"name": "r1", "endpoints": urls, "model": "deepseek-r1"}]})
    assert not recipe.uses_sandbox()
    teacher = recipe.distill_config().teacher("r1")
    assert teacher.replica_urls() == urls and teacher.base_url == urls[0]


def test_public_url_keeps_no_secrets() -> None:
    assert public_url("http://user:pw@gpu-0:8000/v1/?api-key=s3cret#x") == "http://gpu-0:8000/v1"
    assert public_url("https://[::1]:9000/v1") == "https://[::1]:9000/v1"
    assert public_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


# ---------------------------------------------------------------------------- router


def test_least_in_flight_replica_gets_the_request() -> None:
    """A replica busy with a slow request gets nothing more while the others are idle."""
    with (
        start_sandbox(latency_s=1.0) as slow,
        start_sandbox() as b,
        start_sandbox() as c,
    ):

        async def go() -> None:
            fleet = _fleet([slow.base_url, b.base_url, c.base_url])
            try:
                pinned = asyncio.ensure_future(_chat(fleet, 0))  # all idle: the first replica
                await _until(lambda: fleet.replicas[0].in_flight == 1)
                served = [served_by(await _chat(fleet, seed)) for seed in range(1, 11)]
                assert served_by(await pinned) == slow.base_url
            finally:
                await fleet.close()
            assert served == [b.base_url, c.base_url] * 5  # ties go to the replica that served fewer

        asyncio.run(go())
        assert [len(s.stats()["log"]) for s in (slow, b, c)] == [1, 5, 5]


def test_dead_replica_is_ejected_and_the_retry_fails_over_without_backoff() -> None:
    dead = _url(free_port())
    with start_sandbox() as live:
        teacher = TeacherConfig(
            name="t", endpoints=[dead, live.base_url], model="m", server="generic", replica_probe_s=60
        )

        async def go() -> None:
            client = EndpointClient(teacher, SECRET)
            fleet = client.transport
            assert isinstance(fleet, FleetTransport)
            limiter = LocalRateLimiter.for_teachers([teacher])
            kwargs = {"model": "m", "messages": MESSAGES, "seed": 1}
            try:
                started = time.monotonic()
                # A backoff of 30 s would show: a failover must not wait for it.
                response, attempts, _, error = await request_with_retries(
                    client, kwargs, max_attempts=3, limiter=limiter, estimate=10, backoff=Backoff(30, 60)
                )
                assert time.monotonic() - started < 5
                assert response is not None and attempts == 2 and error is None
                assert client.endpoint_of(response) == live.base_url
                assert fleet.snapshot()[0]["healthy"] is False and fleet.snapshot()[0]["ejections"] == 1
                # One replica's failure is not the teacher's outage: the breaker counts nothing.
                assert client.breaker.tripped is None and client.breaker.outage_since is None
                # While ejected (probe not due), the dead replica gets no request at all.
                for seed in range(2, 6):
                    r, attempts, _, _ = await request_with_retries(
                        client, {**kwargs, "seed": seed}, max_attempts=3, limiter=limiter, estimate=10
                    )
                    assert attempts == 1 and client.endpoint_of(r) == live.base_url
            finally:
                await client.close()

        asyncio.run(go())
        assert len(live.stats()["log"]) == 5


def test_failure_while_all_replicas_are_out_is_an_outage() -> None:
    urls = [_url(free_port()), _url(free_port())]

    async def go() -> None:
        fleet = _fleet(urls)
        try:
            with pytest.raises(ReplicaDown) as first:
                await _chat(fleet, 1)
            assert fleet.classify(first.value).outage is False and fleet.classify(first.value).delay == 0.0
            with pytest.raises(Exception) as last:  # the last healthy replica fails: no failover left
                await _chat(fleet, 2)
            assert not isinstance(last.value, ReplicaDown)
            assert fleet.classify(last.value).outage is True
            assert [r["healthy"] for r in fleet.snapshot()] == [False, False]
        finally:
            await fleet.close()

    asyncio.run(go())


def test_ejected_replica_is_probed_back_after_its_cooldown() -> None:
    clock = Clock()
    with start_sandbox() as a, start_sandbox() as b:
        port = b.port

        async def go() -> None:
            nonlocal b
            fleet = _fleet([a.base_url, b.base_url], probe_after_s=1.0, probe_max_s=8.0, clock=clock)
            replica = fleet.replicas[1]
            try:
                assert served_by(await _chat(fleet, 1)) == a.base_url
                await asyncio.to_thread(b.kill)
                # Three at once: two are sent to b (least loaded), which is down; both fail over.
                results = await asyncio.gather(
                    *(_chat(fleet, s) for s in (20, 21, 22)), return_exceptions=True
                )
                assert sum(isinstance(r, ReplicaDown) for r in results) == 2
                # One ejection: the second failure was in flight already and does not lengthen it.
                assert replica.ejected and replica.cooldown == 1.0 and replica.ejections == 1
                # Cooldown not over: no probe, every request goes to a.
                assert served_by(await _chat(fleet, 3)) == a.base_url and not replica.probing
                # Due: a probe (GET /models) goes out and fails; the next one waits twice as long.
                clock.now += 1.5
                assert served_by(await _chat(fleet, 4)) == a.base_url
                await _until(lambda: not replica.probing)
                assert replica.ejected and replica.cooldown == 2.0
                b = await asyncio.to_thread(start_sandbox, port=port)  # restarted on the same port
                clock.now += 1.0  # not due yet
                assert served_by(await _chat(fleet, 5)) == a.base_url and not replica.probing
                clock.now += 1.5
                await _chat(fleet, 6)
                await _until(lambda: not replica.ejected)
                # Back in the rotation: concurrent requests spread over both again.
                served = await asyncio.gather(*(_chat(fleet, s) for s in range(7, 11)))
                assert {served_by(r) for r in served} == {a.base_url, b.base_url}
                assert replica.ejections == 1
            finally:
                await fleet.close()

        try:
            asyncio.run(go())
            log = b.stats()["log"]
            assert log and all(entry["seed"] >= 7 for entry in log)  # only real requests after the probe
        finally:
            b.stop()


class NoProbeTransport(HTTPTransport):
    """The HTTP transport without the cheap probe: the fleet must use a real request as the probe."""

    probe = None


def test_without_a_probe_the_next_request_is_the_trial() -> None:
    clock = Clock()
    port = free_port()
    with start_sandbox() as a:
        urls = [_url(port), a.base_url]

        async def go() -> None:
            fleet = FleetTransport(
                [(u, NoProbeTransport(u, SECRET, 10.0)) for u in urls], probe_after_s=1.0, clock=clock
            )
            try:
                with pytest.raises(ReplicaDown):
                    await _chat(fleet, 1)
                with start_sandbox(port=port) as b:
                    clock.now += 2.0
                    response = await _chat(fleet, 2)  # the trial goes to the ejected replica
                    assert served_by(response) == b.base_url
                    assert fleet.snapshot()[0]["healthy"] is True
            finally:
                await fleet.close()

        asyncio.run(go())


# ---------------------------------------------------------------------------- end to end


def _config(urls: list[str], samples: int = 4, **teacher) -> DistillConfig:
    t = {"name": "fleet", "model": "sandbox-r1", "server": "generic", "max_in_flight": 6}
    t["endpoints" if len(urls) > 1 else "base_url"] = urls if len(urls) > 1 else urls[0]
    t.update(teacher)
    return DistillConfig.parse(
        {
            "teachers": [t],
            "samples": samples,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.2,
            "flush_interval_s": 0.05,
            "flush_every": 16,
        }
    )


def _raw(out: str) -> list[dict]:
    return storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_all().to_pylist()


SAME = ("question_id", "sample_idx", "seed", "teacher", "model", "params_hash", "reasoning", "response")


def test_fleet_survives_a_replica_killed_and_restarted_mid_run(tmp_path: Path) -> None:
    q_uri = str(tmp_path / "q")
    questions = make_questions(q_uri, 60)
    expected = len(questions) * 4
    # The reference: the same shard from one healthy server (the sandbox answers from prompt + seed).
    with start_sandbox() as ref:
        reference = distill_shard(q_uri, "00000", str(tmp_path / "ref"), _config([ref.base_url]))
    assert reference.complete
    ref_rows = {(r["question_id"], r["sample_idx"]): r for r in _raw(str(tmp_path / "ref"))}
    assert {r["endpoint"] for r in ref_rows.values()} == {ref.base_url}  # a single endpoint: its URL

    servers = [start_sandbox(latency_s=0.03, max_concurrency=2) for _ in range(3)]
    a, b, c = servers
    port = b.port
    restarted: list = []
    killed_at: list[float] = []

    def chaos() -> None:
        # Kill b once it has served a part of the shard; restart it on the same port once a and c
        # carried on without it; the run must still have work left for b after its probe.
        while len(b.stats()["log"]) < 15:
            time.sleep(0.01)
        b.kill()
        killed_at.append(time.time())  # after the kill returned: b took no request after this
        while len(a.stats()["log"]) + len(c.stats()["log"]) < 90:
            time.sleep(0.01)
        restarted.append(start_sandbox(port=port, latency_s=0.03, max_concurrency=2))

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    try:
        cfg = _config([s.base_url for s in servers], replica_probe_s=0.05, replica_probe_max_s=0.2)
        report = distill_shard(q_uri, "00000", str(tmp_path / "out"), cfg)
        thread.join(30)
        b2 = restarted[0]
        logs = {"a": a.stats()["log"], "b": b.stats()["log"], "c": c.stats()["log"], "b2": b2.stats()["log"]}
    finally:
        for s in servers + restarted:
            s.stop()

    rows = _raw(str(tmp_path / "out"))
    assert report.complete and report.aborted is None and report.failed == 0
    # Exact output: every question has exactly N samples, identical to the single-server run.
    assert len(rows) == expected == report.stored
    assert {(r["question_id"], r["sample_idx"]) for r in rows} == set(ref_rows)
    for r in rows:
        ref_row = ref_rows[(r["question_id"], r["sample_idx"])]
        assert {k: r[k] for k in SAME} == {k: ref_row[k] for k in SAME}

    # Every sample's requests, in arrival order over all servers (a sample's seed is its key here).
    arrivals: dict[int, list[tuple[float, str]]] = defaultdict(list)
    for name, log in logs.items():
        for entry in log:
            arrivals[entry["seed"]].append((entry["t"], name))
    assert len(arrivals) == expected
    url = {"a": a.base_url, "b": b.base_url, "c": c.base_url, "b2": b.base_url}
    for r in rows:
        seen = sorted(arrivals[r["seed"]])
        # The row names the server its last request reached: nothing was requested after it was
        # served, so no stored sample was requested again.
        assert r["endpoint"] == url[seen[-1][1]]
        # A sample requested twice lost its first request to the kill (in flight at b), only then.
        for t, name in seen[:-1]:
            assert name == "b" and t <= killed_at[0]
    # At most what b had in flight (the teacher's in-flight bound) was lost and requested again;
    # each such failover is a retry (requests refused before b was ejected are retries too).
    re_requested = sum(len(v) - 1 for v in arrivals.values())
    assert re_requested <= report.retries <= 2 * cfg.teachers[0].max_in_flight
    # The restarted replica was probed back in and served samples again (rows name it, above).
    assert logs["b2"]
    assert {r["endpoint"] for r in rows} == {a.base_url, b.base_url, c.base_url}


def test_one_dead_replica_does_not_spend_the_teachers_outage_budget(tmp_path: Path) -> None:
    q_uri = str(tmp_path / "q")
    make_questions(q_uri, 20)
    dead = _url(free_port())
    with start_sandbox(latency_s=0.02) as a, start_sandbox(latency_s=0.02) as c:
        # A tight budget and breaker: a single endpoint this dead would fail the shard at once.
        cfg = _config(
            [dead, a.base_url, c.base_url],
            outage_budget_s=0.2,
            replica_probe_s=0.05,
            replica_probe_max_s=0.1,
        )
        report = distill_shard(q_uri, "00000", str(tmp_path / "out"), cfg)
    rows = _raw(str(tmp_path / "out"))
    assert report.complete and report.aborted is None and len(rows) == 80
    assert {r["endpoint"] for r in rows} == {a.base_url, c.base_url}


def test_all_replicas_down_fails_the_shard_naming_the_teacher(tmp_path: Path) -> None:
    q_uri = str(tmp_path / "q")
    make_questions(q_uri, 10)
    urls = [_url(free_port()) for _ in range(3)]
    started = time.monotonic()
    report = distill_shard(q_uri, "00000", str(tmp_path / "out"), _config(urls, outage_budget_s=1.0))
    assert time.monotonic() - started < 30
    assert not report.complete and report.new_samples == 0
    assert report.aborted and "teacher 'fleet'" in report.aborted and "+2 more replicas" in report.aborted


def test_rate_budget_stays_per_teacher_across_replicas(tmp_path: Path) -> None:
    q_uri = str(tmp_path / "q")
    make_questions(q_uri, 20)
    with start_sandbox() as a, start_sandbox() as b, start_sandbox() as c:
        cfg = _config(
            [a.base_url, b.base_url, c.base_url], rpm=10, rate_window_s=1.0, samples=2, max_in_flight=32
        )
        report = distill_shard(q_uri, "00000", str(tmp_path / "out"), cfg)
        logs = [s.stats()["log"] for s in (a, b, c)]
    assert report.complete and sum(len(log) for log in logs) == 40
    assert all(logs)  # spread over the replicas ...
    merged = sorted(entry["t"] for log in logs for entry in log)
    # ... within one budget for the teacher, not three: 10 per second over all replicas (per-replica
    # budgets would let 30 through at once). The window is cut by 0.1 s for arrival jitter: the
    # first requests open three connection pools in a process the servers share.
    assert max_in_window(merged, 0.9) <= 10
    assert merged[-1] - merged[0] >= 3.0  # 40 requests at 10 per window: at least three windows on


def test_cli_distills_over_endpoints(tmp_path: Path, capsys) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 6)
    with start_sandbox() as a, start_sandbox() as b:
        argv = ["distill", q_uri, "--endpoint", a.base_url, "--endpoint", b.base_url, "--model", "m"]
        argv += ["--samples", "2", "--executor", "local", "--no-progress", "--out", out]
        assert main(argv) == 0, capsys.readouterr().err
        counts = [len(s.stats()["log"]) for s in (a, b)]
    rows = _raw(out)
    assert len(rows) == 12 and sum(counts) == 12 and min(counts) > 0
    assert {r["endpoint"] for r in rows} == {a.base_url, b.base_url}
    assert KEY not in capsys.readouterr().out


def test_moving_a_teacher_onto_a_fleet_requests_nothing_again(tmp_path: Path) -> None:
    """Endpoints are not part of any sample key: stored samples stay done on a new fleet."""
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 5)
    with start_sandbox() as single:
        first = distill_shard(q_uri, "00000", out, _config([single.base_url]))
    assert first.complete and first.new_samples == 20
    with start_sandbox() as a, start_sandbox() as b:
        again = distill_shard(q_uri, "00000", out, _config([a.base_url, b.base_url]))
        assert a.stats()["requests"] == 0 and b.stats()["requests"] == 0
    assert again.complete and again.requests == 0 and again.stored_before == 20
