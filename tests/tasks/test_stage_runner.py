"""The stage runner, run by every executor (local, Prefect, Ray, Prefect on Ray) on one toy stage.

The toy stage doubles a column shard by shard and writes into its done marker what it was lent
by ``bind`` (a key for its endpoint, a shared limiter). Attempts are counted in files (executors
run shards in threads, Prefect tasks and Ray actors alike), so what is asserted is what ran.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.layout import RunPaths
from octomed_data.lease import shard_lease
from octomed_data.runs import shard_states
from octomed_data.stages import LocalExecutor, Runtime, Stage, run_stage
from octomed_data.stages import runner as stage_runner
from octomed_data.teachers import TeacherConfig

SHARDS = ("00000", "00001", "00002")
SCHEMA = pa.schema([("x", pa.int64())])
KEY_ENV = "OCTOMED_TOY_STAGE_KEY"
KEY = "sk-toy-only-in-the-driver"
ENDPOINT = TeacherConfig(
    name="toy", base_url="http://127.0.0.1:9/v1", model="toy-model", api_key_env=KEY_ENV, rpm=6000
)


class ToyStage(Stage):
    """``in`` -> ``out`` (x doubled); fails on demand: ``fail_times`` transient failures per shard,
    a ConfigError for the shards in ``config_error``; ``hold_s`` keeps a shard busy."""

    name = "toy"

    def __init__(
        self,
        paths: RunPaths,
        *,
        fail_times: dict[str, int] | None = None,
        config_error: tuple[str, ...] = (),
        hold_s: float = 0.0,
        endpoint: TeacherConfig = ENDPOINT,
    ) -> None:
        super().__init__(paths)
        self.endpoint = endpoint
        self.fail_times = dict(fail_times or {})
        self.config_error = set(config_error)
        self.hold_s = hold_s
        self.runtime: Runtime | None = None

    def input_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.paths.local("in"), SCHEMA)

    def done_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.paths.local("out"), SCHEMA)

    def fingerprint(self) -> str | None:
        return "toy-1"

    def endpoints(self) -> list[TeacherConfig]:
        return [self.endpoint]

    def bind(self, runtime: Runtime) -> ToyStage:
        other = copy.copy(self)
        other.runtime = runtime
        return other

    def run_shard(self, shard: str) -> dict[str, Any]:
        n = note_attempt(self.paths, shard)
        if shard in self.config_error:
            raise ConfigError(f"toy shard {shard}: a setting that fails the same way every time")
        if n <= self.fail_times.get(shard, 0):
            raise RuntimeError(f"toy shard {shard}: transient failure on attempt {n}")
        time.sleep(self.hold_s)
        key = (self.runtime.api_keys if self.runtime else {}).get(ENDPOINT.name)
        counts = {
            "rows": 0,
            "bound": self.runtime is not None,
            "key_ok": key is not None and key.get_secret_value() == KEY,
            "limiter": self.runtime is not None and self.runtime.limiter is not None,
        }
        rows = [{"x": 2 * r["x"]} for r in self.input_dataset().read_shard(shard).to_pylist()]
        counts["rows"] = len(rows)
        self.done_dataset().write_shard(shard, rows, extra=self.marker_extra(shard, counts))
        return counts


def note_attempt(paths: RunPaths, shard: str) -> int:
    """Count one attempt at ``shard`` (a file each: seen by every process); returns the count."""
    folder = Path(paths.root) / "attempts" / shard
    folder.mkdir(parents=True, exist_ok=True)
    (folder / uuid.uuid4().hex).touch()
    return attempts(paths, shard)


def attempts(paths: RunPaths, shard: str) -> int:
    folder = Path(paths.root) / "attempts" / shard
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def make_run(root: Path) -> RunPaths:
    paths = RunPaths.at(str(root))
    source = storage.Dataset(paths.local("in"), SCHEMA)
    for n, shard in enumerate(SHARDS):
        source.write_shard(shard, [{"x": 10 * n + i} for i in range(3)])
    return paths


def records(paths: RunPaths) -> dict[str, dict[str, Any]]:
    return {r["shard"]: r for r in shard_states(paths, "toy")}


# ------------------------------------------------------------------------------------ executors
def run_local(stage: Stage, **kwargs: Any):
    return run_stage(stage, LocalExecutor(retries=2), **kwargs)


def run_ray(stage: Stage, **kwargs: Any):
    from tasks.ray_executor import RayExecutor

    return run_stage(stage, RayExecutor(retries=2), **kwargs)


def run_prefect(stage: Stage, *, ray: bool = False, **kwargs: Any):
    from prefect import flow

    from tasks.prefect_executor import PrefectExecutor

    @flow(name="toy-stage")
    def toy_flow():
        return run_stage(stage, PrefectExecutor(ray=ray), **kwargs)

    return toy_flow()


SERVED = {
    "ray": (run_ray, True),
    "prefect": (run_prefect, False),
    "prefect-ray": (lambda stage, **kw: run_prefect(stage, ray=True, **kw), True),
}


@pytest.fixture
def key_in_env(monkeypatch) -> None:
    """The toy endpoint's key, in this (the driver's) environment only."""
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture(params=list(SERVED))
def served(request, key_in_env, prefect_harness, ray_local):
    """(run, limiter expected) for the Ray, Prefect and Prefect-on-Ray executors."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the toy stage travels by value
    return SERVED[request.param]


def check_done_shards_skipped_and_runtime_bound(run, pooled: bool, tmp_path: Path) -> None:
    paths = make_run(tmp_path / "run")
    first = run(ToyStage(paths))
    assert not first.failed and not first.pending
    assert {s: o.state for s, o in first.outcomes.items()} == dict.fromkeys(SHARDS, "COMPLETED")
    for outcome in first.outcomes.values():
        # bind() got the key resolved from the driver's environment, and on Ray the shared limiter
        assert outcome.counts == {"rows": 3, "bound": True, "key_ok": True, "limiter": pooled}
    assert storage.Dataset(paths.local("out")).read_shard("00001").column("x").to_pylist() == [20, 22, 24]
    assert {s: attempts(paths, s) for s in SHARDS} == dict.fromkeys(SHARDS, 1)

    again = run(ToyStage(paths))
    assert {s: o.state for s, o in again.outcomes.items()} == dict.fromkeys(SHARDS, "REUSED")
    assert {s: attempts(paths, s) for s in SHARDS} == dict.fromkeys(SHARDS, 1)  # nothing ran
    # A named shard is run again even when done.
    named = run(ToyStage(paths), shards=["00002"])
    assert named.outcomes["00002"].state == "COMPLETED" and attempts(paths, "00002") == 2


def check_failed_shard_retried_config_error_not(run, tmp_path: Path) -> None:
    paths = make_run(tmp_path / "run")
    result = run(ToyStage(paths, fail_times={"00001": 1}, config_error=("00002",)))
    states = {s: o.state for s, o in result.outcomes.items()}
    assert states == {"00000": "COMPLETED", "00001": "COMPLETED", "00002": "FAILED"}
    assert {s: attempts(paths, s) for s in SHARDS} == {"00000": 1, "00001": 2, "00002": 1}
    assert "ConfigError" in result.failed["00002"] and "fails the same way" in result.failed["00002"]
    recorded = records(paths)
    assert recorded["00001"]["state"] == "COMPLETED" and recorded["00001"]["attempt"] == 2
    assert recorded["00002"]["state"] == "FAILED" and recorded["00002"]["attempt"] == 1
    assert not result.final  # no finalize over a partial stage


def test_local_done_shards_are_skipped_and_bind_lends_the_runtime(key_in_env, tmp_path) -> None:
    check_done_shards_skipped_and_runtime_bound(run_local, False, tmp_path)


def test_served_done_shards_are_skipped_and_bind_lends_the_runtime(served, tmp_path) -> None:
    check_done_shards_skipped_and_runtime_bound(*served, tmp_path)


def test_local_failed_shard_is_retried_and_a_config_error_is_not(key_in_env, tmp_path) -> None:
    check_failed_shard_retried_config_error_not(run_local, tmp_path)


def test_served_failed_shard_is_retried_and_a_config_error_is_not(served, tmp_path) -> None:
    check_failed_shard_retried_config_error_not(served[0], tmp_path)


def test_retries_end_after_the_policy_s_attempts(key_in_env, tmp_path) -> None:
    paths = make_run(tmp_path / "run")
    result = run_stage(ToyStage(paths, fail_times={"00000": 99}), LocalExecutor(retries=1))
    assert "transient failure on attempt 2" in result.failed["00000"]
    assert attempts(paths, "00000") == 2 and records(paths)["00000"]["attempt"] == 2
    assert stage_runner.RETRY.retries == 2  # Prefect's task retries and `rerun` use this one policy


def test_a_shard_whose_lease_another_writer_holds_is_not_run(key_in_env, tmp_path, monkeypatch) -> None:
    """One writer per shard: a live lease held elsewhere makes the runner wait (two TTLs), then
    refuse; an expired one (its holder died) is taken over."""
    monkeypatch.setattr(stage_runner, "LEASE_TTL_S", 0.5)
    paths = make_run(tmp_path / "run")
    shard_lease(paths, "toy", "00000", "another-writer", ttl_s=60).acquire()
    shard_lease(paths, "toy", "00001", "a-dead-writer", ttl_s=0.2).acquire()
    time.sleep(0.3)
    t0 = time.monotonic()
    result = run_stage(ToyStage(paths), LocalExecutor())
    assert time.monotonic() - t0 >= 1.0  # it waited for the live holder
    assert set(result.failed) == {"00000"} and "held by 'another-writer'" in result.failed["00000"]
    assert attempts(paths, "00000") == 0 and "00000" not in storage.Dataset(paths.local("out")).manifest()
    assert records(paths)["00000"]["state"] == "FAILED"  # a failure around the shard is recorded too
    assert result.outcomes["00001"].state == "COMPLETED" and attempts(paths, "00001") == 1  # taken over


def check_second_runner_waits(run, tmp_path: Path) -> None:
    """Two runners on one shard at once: the second waits for the lease, then answers the shard
    from its marker; the shard ran once."""
    paths = make_run(tmp_path / "run")
    first = threading.Thread(
        target=stage_runner.run_guarded, args=(ToyStage(paths, hold_s=3.0), "00000", Runtime())
    )
    first.start()
    deadline = time.monotonic() + 10
    while attempts(paths, "00000") == 0 and time.monotonic() < deadline:  # the first one is running
        time.sleep(0.05)
    result = run(ToyStage(paths), shards=["00000"], force=False)
    first.join()
    assert result.outcomes["00000"].state == "REUSED"
    assert attempts(paths, "00000") == 1


def test_local_second_runner_waits_for_the_first_and_finds_the_shard_done(key_in_env, tmp_path) -> None:
    check_second_runner_waits(run_local, tmp_path)


def test_served_second_runner_waits_for_the_first_and_finds_the_shard_done(served, tmp_path) -> None:
    check_second_runner_waits(served[0], tmp_path)


def test_prefect_lends_a_key_from_a_secret_block_and_a_missing_block_fails_every_shard_once(
    prefect_harness, tmp_path, monkeypatch
) -> None:
    """A teacher naming a Prefect Secret block gets its key from there (not the environment); a
    block that does not exist fails every shard in one line naming it, and nothing runs."""
    from prefect.blocks.system import Secret

    monkeypatch.delenv(KEY_ENV, raising=False)
    Secret(value=KEY).save("octomed-toy-key", overwrite=True)
    paths = make_run(tmp_path / "run")
    with_block = ENDPOINT.model_copy(update={"api_key_secret": "octomed-toy-key"})
    result = run_prefect(ToyStage(paths, endpoint=with_block))
    assert {s: o.counts["key_ok"] for s, o in result.outcomes.items()} == dict.fromkeys(SHARDS, True)

    missing = ENDPOINT.model_copy(update={"api_key_secret": "octomed-no-such-block"})
    other = make_run(tmp_path / "other")
    failed = run_prefect(ToyStage(other, endpoint=missing))
    assert set(failed.failed) == set(SHARDS)
    assert all("'octomed-no-such-block' for teacher 'toy'" in e for e in failed.failed.values())
    assert {s: attempts(other, s) for s in SHARDS} == dict.fromkeys(SHARDS, 0)
    assert {r["state"] for r in records(other).values()} == {"FAILED"}


def test_a_prefect_pass_keeps_nothing_per_shard_task_in_the_flow_run(
    key_in_env, prefect_harness, tmp_path
) -> None:
    """Issue 26: Prefect's flow run keeps, for its whole life, a copy of each task's state keyed by
    its result's id, the thread pool's cancel event and an assets set per task run (~2.4 KB a task
    run: the driver grew +50% from 1,000 to 10,000 shards through Prefect). The executor lets go of
    a shard task's entries as soon as it has read its outcome."""
    from prefect import flow
    from prefect.context import FlowRunContext

    from tasks.prefect_executor import PrefectExecutor

    paths = make_run(tmp_path / "run")

    @flow(name="toy-stage")
    def toy_flow():
        result = run_stage(ToyStage(paths, fail_times={"00001": 1}), PrefectExecutor())
        ctx = FlowRunContext.get()
        kept = [entry[0].state_details.task_run_id for entry in ctx.run_results.values()]
        return result, kept, len(ctx.task_run_assets), len(ctx.task_runner._cancel_events)

    result, kept, assets, cancel_events = toy_flow()
    assert {s: o.state for s, o in result.outcomes.items()} == dict.fromkeys(SHARDS, "COMPLETED")
    assert {s: attempts(paths, s) for s in SHARDS} == {"00000": 1, "00001": 2, "00002": 1}
    assert (kept, assets, cancel_events) == ([], 0, 0)
