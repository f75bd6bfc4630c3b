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
    assert isinstance(plain.breaker, OutageBreaker)  # every client now has the budget (default 120 s)
    plain.breaker = Breaker(teacher.name, teacher.base_url)  # the request-counting breaker alone
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
    assert (a.epoch, b.epoch) == (1, 2)  # the takeover is a new epoch (the fencing token)
    b.release()
    assert b.read()["owner"] is None and not b.held()
    c = Lease(uri, "c", ttl_s=0.6, settle_s=0)
    assert c.try_acquire() and c.epoch == 3  # epochs only grow, also after a release


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


@pytest.mark.parametrize("store", ["local", "s3"])
def test_taking_over_an_expired_lease_has_one_winner(tmp_path: Path, store: str, request) -> None:
    """Defect 9 (fencing): a takeover was remove-then-create, so two restarted jobs racing for a
    dead writer's shard could both believe they held it. Now it is winning the claim of the next
    epoch, written only if absent (a hard link locally, a conditional PUT on S3)."""
    root = request.getfixturevalue("s3_bucket") if store == "s3" else str(tmp_path)
    uri = storage.join(root, "state", "distill", "00007.lease")
    dead = Lease(uri, "dead", ttl_s=0.3, settle_s=0)
    assert dead.try_acquire()
    time.sleep(0.4)  # its holder died: expired
    wins: list[Lease] = []

    def take(owner: str) -> None:
        lease = Lease(uri, owner, ttl_s=30, settle_s=0.05)
        if lease.try_acquire():
            wins.append(lease)

    threads = [threading.Thread(target=take, args=(f"o{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1, [w.owner for w in wins]
    (winner,) = wins
    assert winner.epoch == 2 and winner.held() and not dead.held()
    assert storage.create_exclusive(winner._claim_uri(2), b"{}") is False  # the claim is taken


def test_a_writer_that_lost_its_lease_publishes_nothing(tmp_path: Path) -> None:
    """Defect 9 (fencing at commit): a leftover writer of a killed run still running its shard must
    not publish a journal segment or commit the shard once a restarted run has taken the lease."""
    import pyarrow as pa

    from octomed_data.distill.journal import JournalWriter, segment_uris
    from octomed_data.runs import LeaseLost

    paths = RunPaths(str(tmp_path), "r")
    ds = storage.Dataset(str(tmp_path / "raw"), pa.schema([("x", pa.int64())]))
    old = shard_lease(paths, "distill", "00000", "leftover", ttl_s=0.3)
    old.acquire()
    with old.fence():
        writer = storage.ShardWriter(ds, "00000")
        writer.add({"x": 1})
        time.sleep(0.4)  # the leftover's driver died: no renewal, the lease expired ...
        new = shard_lease(paths, "distill", "00000", "restarted", ttl_s=30)
        assert new.try_acquire()  # ... and the restarted run took the shard over
        with pytest.raises(LeaseLost, match="lost to 'restarted'"):
            writer.commit()

        async def journal() -> None:
            jw = JournalWriter(str(tmp_path / "run"), "00000", every=1).start()
            jw.add({"key": "k", "response": "r"})
            with pytest.raises(LeaseLost):
                await jw.close()

        asyncio.run(journal())
    assert ds.shard_info("00000") is None and not Path(ds.file_uri("00000")).exists()  # no file, no marker
    assert segment_uris(str(tmp_path / "run"), "00000") == []  # no journal segment either
    with new.fence():  # the holder writes as usual
        storage.ShardWriter(ds, "00000").commit()
    assert ds.shard_info("00000") is not None


def test_lease_hold_heartbeat_keeps_it_and_reports_a_takeover(tmp_path: Path) -> None:
    uri = str(tmp_path / "y.lease")
    lost = threading.Event()
    lease = Lease(uri, "me", ttl_s=0.3, settle_s=0)
    with lease.hold(on_lost=lost.set):
        time.sleep(0.7)  # longer than the TTL: the heartbeat renewed it
        assert lease.held()
        # A heartbeat that read its own lease just before the thief's write renews over it (a real
        # takeover claims a higher epoch first): the thief writes again until the holder sees it.
        deadline = time.monotonic() + 20
        while not lost.is_set() and time.monotonic() < deadline:
            storage.write_json(uri, {"owner": "thief", "expires_at": time.time() + 60})
            lost.wait(0.5)
        assert lost.is_set()
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


# ------------------------------------------------------------------------- one writer per shard
def test_a_restarted_run_waits_for_a_leftover_writer_and_the_leftover_stops_writing(tmp_path: Path) -> None:
    """Defect 9: a leftover actor of a killed run kept writing a shard the restarted run also ran.
    Now the shard's lease fences it: the new writer waits for the old lease to expire, and a writer
    that lost its lease is cancelled before its next write."""
    from types import SimpleNamespace

    from octomed_data.stages.runner import run_fenced

    paths = RunPaths(str(tmp_path), "r")
    stage = SimpleNamespace(name="distill", paths=paths)
    writes: list[tuple[str, float]] = []

    async def writer(name: str, n: int) -> str:
        for _ in range(n):
            writes.append((name, time.time()))
            await asyncio.sleep(0.05)
        return name

    # A leftover (dead) writer's lease: still valid for 0.6 s.
    shard_lease(paths, "distill", "00000", "leftover", ttl_s=0.6).acquire()
    t0 = time.time()
    assert asyncio.run(run_fenced(stage, "00000", lambda: writer("new", 2), ttl_s=0.6, owner="new")) == "new"
    assert writes[0][1] - t0 >= 0.5  # waited for the lease to expire, did not share the shard
    assert shard_lease(paths, "distill", "00000", "x").read()["owner"] is None  # released

    writes.clear()
    raised_at: list[float] = []

    async def stolen() -> None:
        stop = asyncio.Event()

        async def thief() -> None:  # a restarted run that took the shard over, renewing its claim
            await asyncio.sleep(0.3)
            while not stop.is_set():  # (a one-off write can land inside the old heartbeat's read-then-write)
                storage.write_json(
                    shard_lease(paths, "distill", "00001", "x").uri,
                    {"owner": "restarted", "expires_at": time.time() + 60},
                )
                writes.append(("stolen", time.time()))
                await asyncio.sleep(0.05)

        steal = asyncio.ensure_future(thief())
        with pytest.raises(LeaseHeld, match="lost its lease to 'restarted'"):
            await run_fenced(stage, "00001", lambda: writer("old", 200), ttl_s=0.3, owner="old")
        raised_at.append(time.time())
        await asyncio.sleep(0.3)  # a writer left running would write again meanwhile
        stop.set()
        await steal

    asyncio.run(stolen())
    stolen_at = next(t for n, t in writes if n == "stolen")
    assert raised_at[0] - stolen_at < 2.0  # stopped within a few heartbeats, not after its 200 writes (10 s)
    assert not [t for n, t in writes if n == "old" and t > raised_at[0]]  # and never wrote again
    assert (
        json.loads(Path(shard_lease(paths, "distill", "00001", "x").uri).read_text())["owner"] == "restarted"
    )


# ----------------------------------------------------------------------- training exactly once
def _run_with_export(tmp_path: Path, run_id: str = "t1") -> RunPaths:
    import pyarrow as pa

    from octomed_data.recipe import load_recipe
    from octomed_data.runs import start_run

    paths = start_run(load_recipe("demo"), run_id, str(tmp_path / "store"))
    for text_only in (True, False):  # an export has both TRL configurations (text rows, every row)
        ds = storage.Dataset(paths.trl_split(text_only, "train"))
        ds.write_shard(0, pa.table({"messages": ["[]"] * 3}))
    return paths


def test_train_refuses_a_run_without_an_export_before_creating_anything(
    tmp_path: Path, prefect_harness
) -> None:
    """Defect 6: a quick run of train/train with its defaults created an empty run folder, then failed."""
    from flows.common import RunParams
    from flows.train import TrainParams, train_flow
    from octomed_data.errors import ConfigError
    from octomed_data.recipe import load_recipe
    from octomed_data.runs import start_run

    store = tmp_path / "store"
    with pytest.raises(ConfigError, match=r"^train needs run.run_id.*nothing was created\)$"):
        train_flow(TrainParams(run=RunParams(store=str(store))))
    with pytest.raises(ConfigError, match=r"^no run 'nope'"):
        train_flow(TrainParams(run=RunParams(run_id="nope", store=str(store))))
    assert not store.exists()
    paths = start_run(load_recipe("demo"), "empty", str(store))
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    with pytest.raises(ConfigError, match=r"^run 'empty' has no TRL export at .*run the export flow first"):
        train_flow(TrainParams(run=RunParams(run_id=paths.run_id, store=str(store))))
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_training_runs_once_per_run_and_export_however_often_it_is_triggered(
    tmp_path: Path, prefect_harness, monkeypatch
) -> None:
    """Defect 1: the factory and the automation both trained one run, into one checkpoint folder.
    Now the second trigger for the same export is a no-op, also while the first one still trains,
    and a new export trains again (after the first job let go of the checkpoint folder)."""
    import flows.train as training
    from flows.common import RunParams
    from flows.train import TrainParams, train_flow

    paths = _run_with_export(tmp_path)
    calls: list[float] = []
    overlap: list[bool] = []
    busy = threading.Lock()

    def fake_train(recipe, paths_, params):  # the torchrun job, as seen from the flow
        if not busy.acquire(blocking=False):
            overlap.append(True)
        calls.append(time.time())
        time.sleep(1.5)
        busy.release()
        return {"steps": 2, "checkpoint_uri": paths_.checkpoints}

    monkeypatch.setattr(training, "_train", fake_train)
    monkeypatch.setattr(training, "_after_training", lambda recipe, paths_, params, result: {"train": result})
    params = TrainParams(run=RunParams(run_id=paths.run_id, store=paths.store), evaluate=False)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(train_flow(params))) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join()
    assert len(calls) == 1 and not overlap
    assert sum(1 for r in results if r.get("skipped")) == 2
    assert train_flow(params)["skipped"] and len(calls) == 1  # after it finished: still a no-op

    # A new export (the factory re-ran with more data) is trained once more.
    ds = storage.Dataset(storage.join(paths.trl_export(True), "train"))
    import pyarrow as pa

    ds.write_shard(1, pa.table({"messages": ["[]"] * 2}))
    assert "train" in train_flow(params) and len(calls) == 2


def test_factory_leaves_training_to_the_automation_only_when_it_exists(prefect_harness) -> None:
    """Defects 1-2: the decision used "started by a deployment", not "an automation exists": a
    factory started with `run`/`rerun` trained itself AND the automation trained; under
    `serve --no-automation` nobody trained. Now it asks the server."""
    from flows.automation import AUTOMATION_NAME, ensure_training_automation
    from flows.factory import training_left_to_automation
    from flows.train import train_flow

    deployment_id = train_flow.to_deployment(name="train").apply()
    ensure_training_automation(deployment_id, enabled=False)
    assert training_left_to_automation(True, exported=True) is False  # --no-automation: factory trains
    automation = ensure_training_automation(deployment_id)
    try:
        assert automation is not None and automation.name == AUTOMATION_NAME
        assert training_left_to_automation(True, exported=True) is True  # started with `run`: left to it
        assert training_left_to_automation(True, exported=False) is False  # no export this pass: no trigger
        assert training_left_to_automation(False, exported=True) is False
    finally:
        ensure_training_automation(deployment_id, enabled=False)


def test_the_automation_fires_on_the_export_not_the_mixture() -> None:
    """Defect 3: firing on mixture completion raced the export that training reads."""
    from uuid import uuid4

    from flows.automation import training_automation

    trigger = training_automation(uuid4()).trigger
    assert trigger.match_related.model_dump() == {
        "prefect.resource.role": "flow",
        "prefect.resource.name": "export",
    }
    assert trigger.expect == {"prefect.flow-run.Completed"}


def test_library_log_lines_reach_the_task_run_logs_in_the_ui(prefect_harness) -> None:
    """Retries, outage budget and batch states are logged by the library (``octomed_data.*``);
    Prefect sent only its own loggers to the API, so none of them showed in the UI."""
    import logging
    import uuid

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    import flows.common  # noqa: F401  (installs the forwarding, as every flow module does)

    marker = f"teacher 'down' unreachable, retrying with backoff {uuid.uuid4().hex[:8]}"

    @task
    def shard() -> None:
        logging.getLogger("octomed_data.inference").warning(marker)

    @flow
    def stage() -> None:
        shard()

    # The suite switches API logging off (tests/conftest.py); a served flow has it on.
    with temporary_settings(updates={PREFECT_LOGGING_TO_API_ENABLED: True}):
        stage()
    deadline = time.time() + 20
    found = []
    while time.time() < deadline and not found:
        with get_client(sync_client=True) as client:
            found = [entry for entry in client.read_logs() if marker in entry.message]
        time.sleep(0.5)
    assert found and found[0].task_run_id is not None and found[0].level == logging.WARNING


def test_exclusive_create_without_hard_links_and_a_lost_s3_answer(
    tmp_path: Path, monkeypatch, s3_bucket
) -> None:
    """Review findings: a mount without hard links (FUSE buckets, some NFS/SMB) failed every lease
    claim with an OSError; on S3 a retried conditional PUT whose first answer was lost read as lost."""
    import errno
    import os

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    uri = str(tmp_path / "claims" / "s.lease.0000000001")
    assert storage.create_exclusive(uri, b'{"owner": "a"}') is True
    assert storage.create_exclusive(uri, b'{"owner": "b"}') is False
    assert Path(uri).read_bytes() == b'{"owner": "a"}'
    lease = Lease(str(tmp_path / "claims" / "t.lease"), "me", ttl_s=5, settle_s=0)
    assert lease.try_acquire() and lease.held()
    monkeypatch.undo()

    s3_uri = storage.join(s3_bucket, "state", "x.lease.0000000001")
    assert storage.create_exclusive(s3_uri, b'{"owner": "a"}') is True
    assert storage.create_exclusive(s3_uri, b'{"owner": "a"}') is True  # ours: the answer was lost
    assert storage.create_exclusive(s3_uri, b'{"owner": "b"}') is False


def test_a_ray_shards_batch_state_is_logged_by_its_task_while_it_runs(tmp_path: Path) -> None:
    """A shard on a Ray actor logs in the actor's process, which the Prefect UI never sees; its task
    logs the batch state the shard puts on its attempt record, as it changes."""
    from types import SimpleNamespace

    from tasks.prefect_executor import watch_record

    paths = RunPaths(str(tmp_path), "r")
    stage = SimpleNamespace(name="distill", paths=paths)
    lines: list[str] = []
    with watch_record(stage, "00003", lines.append, every_s=0.05):
        record_shard(paths, "distill", "00003", "RUNNING", attempt=1)
        for state in ("in_progress 2/2", "in_progress 2/2", "completed 1/2, in_progress 1/2"):
            uri = paths.state_uri("distill", "00003")
            storage.write_json(uri, storage.read_json(uri) | {"batch": state})
            time.sleep(0.3)
    assert lines == [
        "distill 00003: batch in_progress 2/2",
        "distill 00003: batch completed 1/2, in_progress 1/2",
    ]
