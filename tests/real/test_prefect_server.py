"""A real Prefect server on loopback (``prefect server start``, once on SQLite in a temporary
PREFECT_HOME and once on PostgreSQL, a private server started here from the Debian packages, as in
production) and ``octomed-data serve`` in its own process, driven through the REST API as the UI
drives it:

1. a factory deployment run completes (the custom re-run of step 3, whole pipeline through training);
2. one shard whose teacher is down fails within the teacher's outage budget, and the flow run names it;
3. a custom run with ``run.run_id`` and ``run.shards=[that shard]`` re-runs exactly it: the other
   shards' Parquet files are byte-identical and the second flow run has only that shard's task run;
4. training starts exactly once per run, through the automation, also when the factory was started
   with ``octomed-data run`` (a subprocess with PREFECT_API_URL set);
5. the factory deployment's nightly schedule is active;
6. a secret canary (the teacher's key, only in the environment of the processes that start runs)
   appears in no API response, in no file under the store or the PREFECT_HOME (SQLite included),
   and nowhere in a ``pg_dump`` of the PostgreSQL database;
7. the UI's Retry of a FAILED factory run started without a ``run_id`` continues the same run id
   (derived from the flow run) and redoes no committed stage; flow runs are named and tagged after it.

The teachers are sandbox teachers started here on loopback: ``primary`` serves every text task type,
``down`` serves ``text_mcq`` (the one ``synth`` shard) and has nothing listening until the re-run.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from octomed_data import storage
from octomed_data.layout import RunPaths
from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DATA = REPO / "octomed_data" / "sample_data"
BIN = Path(sys.executable).parent
KEY_ENV = "OCTOMED_CANARY_KEY"
BROKEN = "synth-00000"
OUTAGE_BUDGET_S = 3.0
SLACK_S = 4.0  # per attempt: process, Ray and request overheads on a busy 2-core machine


# ----------------------------------------------------------------------------------- processes
_started: list[subprocess.Popen] = []


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the process group and every descendant (flow-run subprocesses, Ray), then SIGKILL."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in family:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=10 if sig == signal.SIGTERM else 5)
        if not alive and proc.poll() is not None:
            break
        family = alive
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _kill_all() -> None:
    while _started:
        _kill_tree(_started.pop())


atexit.register(_kill_all)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )
    fh.close()
    _started.append(proc)
    return proc


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV and not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_ENABLE_HTTP2="false",
        PREFECT_LOGGING_TO_API_ENABLED="true",  # the task logs reach the API (and the canary scan)
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return env


# ----------------------------------------------------------------------------------- fixtures
def _write_recipe(tmp: Path, primary_url: str, down_url: str) -> str:
    synth = tmp / "synth.jsonl"  # 4 made-up MCQs (no benchmark item): one text_mcq shard
    with open(synth, "w", encoding="utf-8") as fh:
        for i in range(4):
            options = {"A": f"option {i}a", "B": f"option {i}b", "C": f"option {i}c", "D": f"option {i}d"}
            q = f"Synthetic server-test question {i} {uuid.uuid4().hex[:6]}: which option is listed second?"
            fh.write(
                json.dumps({"question": q, "answer": options["B"], "options": options, "answer_idx": "B"})
            )
            fh.write("\n")
    teacher = {"model": "sandbox-not-a-model", "api_key_env": KEY_ENV, "max_in_flight": 4}
    recipe = {
        "name": "srvtest",
        "store": str(tmp / "store"),
        "shard_size": 40,
        "sources": [
            {
                "format": "pathvqa",
                "input": str(SAMPLE_DATA / "pathvqa" / "QA_pairs_vb.sample80.json"),
                "name": "pathvqa",
            },
            {"format": "medqa", "input": str(synth), "name": "synth"},
        ],
        "teachers": [
            teacher | {"name": "primary", "base_url": primary_url, "outage_budget_s": 10.0},
            teacher | {"name": "down", "base_url": down_url, "outage_budget_s": OUTAGE_BUDGET_S},
        ],
        "routing": {"text_mcq": "down", "text": "primary"},
        "distill": {"samples": 2, "max_concurrent_shards": 3},
        "mixture": {"validation_fraction": 0.2},
        "training": {
            "enabled": True,
            "tiny_model": "text",
            "launcher": "inprocess",
            "config": {
                "max_steps": 1,
                "global_batch_size": 1,
                "max_seq_len": 256,
                "zero_stage": 0,
                "gradient_checkpointing": False,
            },
        },
        "evaluation": {"enabled": False},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


class Stack:
    """The server, ``serve``, the teachers and where everything lives."""

    def __init__(self, tmp: Path, database: str) -> None:
        self.tmp = tmp
        self.database = database  # "sqlite" or "postgresql"
        self.pg = None
        self.home = tmp / "prefect-home"
        self.home.mkdir()
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.canary = f"sk-canary-{uuid.uuid4().hex}"
        self.down_port = free_port()
        self.store = str(tmp / "store")

    def env(self, *, key: bool) -> dict[str, str]:
        env = _base_env(self.home) | {"PREFECT_API_URL": self.api}
        if key:
            env[KEY_ENV] = self.canary
        return env


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(tmp_path_factory, request) -> Iterator[Stack]:
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from octomed_data.sandbox import start_sandbox
    from tests.support.postgres import Postgres

    s = Stack(tmp_path_factory.mktemp("srv"), request.param)
    primary = start_sandbox(latency_s=0.0)
    s.down_sandbox = None
    s.down_url = f"http://127.0.0.1:{s.down_port}/v1"  # nothing listens here until the re-run
    s.recipe = _write_recipe(s.tmp, primary.base_url, s.down_url)
    server_env = _base_env(s.home)  # the server gets no key at all
    try:
        if s.database == "postgresql":
            s.pg = Postgres(free_port()).start()
            # Prefect migrates the empty database by itself on start (asyncpg is its dependency).
            server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = s.pg.url
        t0 = time.time()
        s.server = _start(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(s.port)],
            server_env,
            s.tmp / "server.log",
        )
        _wait(lambda: httpx.get(f"{s.api}/health", timeout=2).status_code == 200, 90, "server health", s)
        s.server_start_s = time.time() - t0
        # The runner polls for due runs every second (default 10 s): a setting, not a code change.
        serve_env = s.env(key=True) | {"PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        s.serve = _start(
            [str(BIN / "octomed-data"), "serve", "--recipe", s.recipe], serve_env, s.tmp / "serve.log"
        )
        with temporary_settings(updates={PREFECT_API_URL: s.api}):
            _wait(lambda: _deployments_ready(s), 120, "serve registering deployments", s)
            yield s
    finally:
        _kill_all()
        primary.stop()
        if s.down_sandbox is not None:
            s.down_sandbox.stop()
        if s.pg is not None:
            s.pg.stop()


def _wait(pred, timeout: float, what: str, s: Stack | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.5)
    logs = ""
    if s is not None:
        for name in ("server.log", "serve.log", "cli.log"):
            p = s.tmp / name
            if p.exists():
                logs += f"\n--- {name} (tail) ---\n" + p.read_text(errors="replace")[-4000:]
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{logs}")


def _deployments_ready(s: Stack) -> bool:
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    from flows.automation import AUTOMATION_NAME
    from flows.deployments import DEPLOYMENTS

    assert s.serve.poll() is None, (s.tmp / "serve.log").read_text(errors="replace")[-4000:]
    with get_client(sync_client=True) as client:
        for d in DEPLOYMENTS:
            dep = client.read_deployment_by_name(f"{d.load_flow().name}/{d.name}")
            if dep.paused:
                return False
    return Automation.read(name=AUTOMATION_NAME).enabled


# ----------------------------------------------------------------------------------- API helpers
def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait_final(flow_run_id, timeout: float, s: Stack):
    final: list[Any] = []

    def done() -> bool:
        with _client() as client:
            fr = client.read_flow_run(flow_run_id)
        if fr.state is not None and fr.state.is_final():
            final.append(fr)
            return True
        return False

    _wait(done, timeout, f"flow run {flow_run_id} to finish", s)
    return final[0]


def _run_factory(s: Stack, **run: Any):
    with _client() as client:
        dep = client.read_deployment_by_name("factory/factory")
        params = {"run": {"recipe_path": s.recipe, "run_id": None, "store": None, "shards": None} | run}
        return client.create_flow_run_from_deployment(dep.id, parameters=params)


def _family(flow_run_id) -> list[Any]:
    """The flow run and every subflow run below it."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with _client() as client:
        out = [client.read_flow_run(flow_run_id)]
        todo = [flow_run_id]
        while todo:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=todo)),
                limit=200,
            )
            out += children
            todo = [c.id for c in children]
    return out


def _task_runs(flow_run_ids: list[Any]) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)), limit=200
        )


def _logs(flow_run_ids: list[Any]) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    out: list[str] = []
    with _client() as client:
        while True:
            page = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)), limit=200, offset=len(out)
            )
            out += [log.message for log in page]
            if len(page) < 200:
                return out


def _train_runs(run_id: str) -> list[Any]:
    """Every ``train`` flow run (deployment or subflow) for ``run_id``."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with _client() as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])), limit=200)
    return [r for r in runs if r.parameters.get("params", {}).get("run", {}).get("run_id") == run_id]


def _check_trained_once(s: Stack, run_id: str, factory_run_ids: list[Any]) -> None:
    """Exactly one ``train`` flow run for the run: the automation's, on the train deployment."""
    from prefect.client.schemas.objects import StateType

    with _client() as client:
        train_dep = client.read_deployment_by_name("train/train")
    _wait(lambda: _train_runs(run_id), 60, f"the automation to start training of {run_id}", s)
    (first,) = _train_runs(run_id)
    first = _wait_final(first.id, 240, s)
    assert first.state.type == StateType.COMPLETED, (first.state, (s.tmp / "serve.log").read_text()[-4000:])
    time.sleep(3)  # a second trigger, had there been one, would have created its run by now
    runs = _train_runs(run_id)
    assert [r.id for r in runs] == [first.id], [(r.name, r.deployment_id, r.created_by) for r in runs]
    assert first.deployment_id == train_dep.id and first.parent_task_run_id is None
    assert first.created_by is not None and first.created_by.type == "AUTOMATION", first.created_by
    # The factory said so, and the idempotency record names that flow run as the one that trained.
    assert any("training: left to the automation" in m for m in _logs(factory_run_ids))
    records = list((Path(s.store) / "runs" / run_id / "state" / "training").glob("*.json"))
    assert len(records) == 1, records
    record = json.loads(records[0].read_text())
    assert record["state"] == "COMPLETED" and record["owner"].endswith(f"|{first.id}"), record
    # One job trained, from step 0 to max_steps (two overlapping jobs ended at 2 x max_steps).
    assert (record["steps"], record["resumed_from_step"]) == (1, 0), record
    marker = storage.read_json(storage.join(RunPaths(s.store, run_id).checkpoints, "checkpoint.json"))
    assert marker["step"] == 1


def _check_rl_after_train(s: Stack, run_id: str) -> None:
    """The automation after a finished train run starts the ``rl`` deployment once; it loads and
    runs (a ``flows/`` module named like a package once broke its imports) and, the recipe leaving
    ``rl.enabled`` off, trains nothing."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.objects import StateType

    def rl_runs() -> list[Any]:
        with _client() as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["rl"])), limit=200)
        return [r for r in runs if r.parameters.get("params", {}).get("run", {}).get("run_id") == run_id]

    _wait(rl_runs, 60, f"the automation to start the rl flow for {run_id}", s)
    (run,) = rl_runs()
    run = _wait_final(run.id, 120, s)
    assert run.state.type == StateType.COMPLETED, (run.state, (s.tmp / "serve.log").read_text()[-4000:])
    assert run.created_by is not None and run.created_by.type == "AUTOMATION", run.created_by
    assert run.parameters["params"]["only_if_enabled"] is True
    said = "leaves rl.enabled off; nothing to do"  # the flow's log, shipped in batches after it ends
    _wait(lambda: any(said in m for m in _logs([run.id])), 30, f"the rl flow run's log line {said!r}", s)


def _raw_files(paths: RunPaths) -> dict[str, bytes]:
    root = Path(paths.raw)
    return {p.name: p.read_bytes() for p in sorted(root.glob("part-*.parquet"))}


# ----------------------------------------------------------------------------------- the test
def test_real_server_serve_rerun_train_once_schedule_and_canary(stack: Stack) -> None:
    from prefect.client.schemas.objects import StateType

    from octomed_data.sandbox import start_sandbox

    s = stack
    t_start = time.time()
    paths = RunPaths(s.store, "srv")

    # 5. The factory deployment's nightly schedule is active.
    with _client() as client:
        factory_dep = client.read_deployment_by_name("factory/factory")
    assert [(x.active, x.schedule.cron) for x in factory_dep.schedules] == [(True, "0 2 * * *")]

    # 2. The `down` teacher has nothing listening: its one shard fails within the outage budget
    #    (per attempt; Prefect retries a transient failure twice), the others are committed.
    first = _wait_final(_run_factory(s, run_id="srv").id, 240, s)
    assert first.state.type == StateType.FAILED, first.state
    assert BROKEN in (first.state.message or ""), first.state.message
    family = _family(first.id)
    distill_tasks = [t for t in _task_runs([f.id for f in family]) if t.name.startswith("distill ")]
    by_name = {t.name: t for t in distill_tasks}
    assert set(by_name) == {"distill pathvqa-00000", "distill pathvqa-00001", f"distill {BROKEN}"}
    broken_task = by_name[f"distill {BROKEN}"]
    assert broken_task.state.type == StateType.FAILED
    assert broken_task.run_count >= 1
    assert broken_task.total_run_time.total_seconds() <= broken_task.run_count * (OUTAGE_BUDGET_S + SLACK_S)
    state = json.loads(Path(paths.state_uri("distill", BROKEN)).read_text())
    assert state["state"] == "FAILED"
    assert "teacher 'down'" in state["error"] and "outage budget" in state["error"], state["error"]
    assert s.down_url.removesuffix("/v1") in state["error"]
    assert state["total_seconds"] <= state["attempt"] * (OUTAGE_BUDGET_S + SLACK_S), state
    assert all(by_name[f"distill pathvqa-0000{i}"].state.type == StateType.COMPLETED for i in (0, 1))
    # The failed shard's raw file holds its failed samples, marked incomplete (not done).
    assert storage.Dataset(paths.raw).shard_info(BROKEN).extra["complete"] is False
    before = {k: v for k, v in _raw_files(paths).items() if BROKEN not in k}
    assert set(before) == {"part-pathvqa-00000.parquet", "part-pathvqa-00001.parquet"}
    assert not _train_runs("srv")  # no export, no training

    # 3. + 1. The teacher is back; the UI's custom run re-runs exactly that shard and completes.
    s.down_sandbox = start_sandbox(port=s.down_port, latency_s=0.0)
    second = _wait_final(_run_factory(s, run_id="srv", shards=[BROKEN]).id, 240, s)
    assert second.state.type == StateType.COMPLETED, (second.state, (s.tmp / "serve.log").read_text()[-4000:])
    family2 = [f.id for f in _family(second.id)]
    distill2 = [t.name for t in _task_runs(family2) if t.name.startswith("distill ")]
    assert distill2 == [f"distill {BROKEN}"]
    after = _raw_files(paths)
    assert set(after) == set(before) | {f"part-{BROKEN}.parquet"}
    assert {k: after[k] for k in before} == before  # byte-identical
    assert storage.Dataset(paths.raw).shard_info(BROKEN).extra["complete"] is True
    assert storage.Dataset(paths.raw).num_rows() == storage.Dataset(paths.questions).num_rows() * 2

    # 4. Training once, by the automation, for the deployment run ...
    _check_trained_once(s, "srv", family2)
    _check_rl_after_train(s, "srv")

    # ... and for a factory started with `octomed-data run` (PREFECT_API_URL set, key where it starts).
    cli = _start(
        [str(BIN / "octomed-data"), "run", s.recipe, "--run-id", "cli"], s.env(key=True), s.tmp / "cli.log"
    )
    _wait(lambda: cli.poll() is not None, 240, "`octomed-data run`", s)
    assert cli.returncode == 0, (s.tmp / "cli.log").read_text(errors="replace")[-4000:]
    with _client() as client:
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        cli_runs = [
            r
            for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["factory"])))
            if r.parameters["run"].get("run_id") == "cli"
        ]
    assert len(cli_runs) == 1 and cli_runs[0].deployment_id is None
    _check_trained_once(s, "cli", [f.id for f in _family(cli_runs[0].id)])

    # 6. The canary: in no API response, no file under the store or the PREFECT_HOME.
    assert s.canary in Path(f"/proc/{s.serve.pid}/environ").read_bytes().decode(errors="replace")
    responses = _read_everything(s.api)
    # The scan reads what it should: the task logs, the runs' parameters, the deployments' defaults.
    assert any(BROKEN in text for text in responses["logs"])
    assert any(s.recipe in text for text in responses["flow_runs"])
    assert any(s.recipe in text for text in responses["deployments"])
    leaks = [name for name, texts in responses.items() for text in texts if s.canary in text]
    assert not leaks, f"canary in API responses: {sorted(set(leaks))}"
    scanned = 0
    for root in (Path(s.store), s.home):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                scanned += 1
                assert s.canary.encode() not in path.read_bytes(), f"canary in {path}"
    assert scanned > 100
    if s.database == "sqlite":
        assert any(p.suffix == ".db" for p in s.home.rglob("*"))  # the database was among the files
    else:
        assert not any(p.suffix == ".db" for p in s.home.rglob("*"))  # it really ran on PostgreSQL
        dump = s.pg.dump()
        assert s.recipe in dump and BROKEN in dump and s.pg.tables() > 20  # the dump holds the runs
        assert s.canary not in dump, "canary in the PostgreSQL database"
    print(
        f"real server test ({s.database}): {time.time() - t_start:.0f} s after a "
        f"{s.server_start_s:.0f} s server start"
    )


# ----------------------------------------------------------------------------------- Retry resumes
RETRY_STAGES = ["ingest", "decontaminate", "distill", "filter", "mixture"]  # no export: no training


def _retry_from_the_ui(s: Stack, flow_run_id) -> dict[str, Any]:
    """What the UI's Retry button sends: the FAILED flow run back to AwaitingRetry (not forced)."""
    import httpx

    state = {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}
    r = httpx.post(
        f"{s.api}/flow_runs/{flow_run_id}/set_state", json={"state": state, "force": False}, timeout=30
    )
    r.raise_for_status()
    return r.json()


def _run_folders(s: Stack) -> set[str]:
    runs = Path(s.store) / "runs"
    return {p.name for p in runs.iterdir() if (p / "run.json").exists()} if runs.exists() else set()


# On the SQLite stack only: the run id derivation and the Retry transition do not depend on the
# database (the PostgreSQL stack runs the scenario above), and it saves a factory run of CI time.
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_ui_retry_of_a_failed_factory_run_resumes_the_same_run_and_redoes_nothing(stack: Stack) -> None:
    """A factory deployment run started WITHOUT a run_id fails (the `down` teacher is down); the UI's
    Retry of that flow run continues the same run id: no ingest, decontaminate or distill shard that
    was committed runs again, and every flow run of it is named and tagged after the run id."""
    from prefect.client.schemas.objects import StateType

    from flows.naming import run_tag
    from octomed_data.sandbox import start_sandbox

    s = stack
    t0 = time.time()
    if s.down_sandbox is not None:  # the scenario above brought it back: down again
        s.down_sandbox.stop()
        s.down_sandbox = None
    before = _run_folders(s)
    with _client() as client:
        dep = client.read_deployment_by_name("factory/factory")
        params = {"run": {"recipe_path": s.recipe, "run_id": None, "store": None, "shards": None}}
        created = client.create_flow_run_from_deployment(dep.id, parameters=params | {"stages": RETRY_STAGES})
    first = _wait_final(created.id, 240, s)
    assert first.state.type == StateType.FAILED, first.state
    (run_id,) = _run_folders(s) - before  # the run the flow run started, named after it
    assert run_id.startswith("srvtest-") and run_id.endswith(created.id.hex[:8]), run_id
    assert first.name == run_id and run_tag(run_id) in first.tags, (first.name, first.tags)
    paths = RunPaths(s.store, run_id)
    committed = {
        stage: {p.name: p.read_bytes() for p in Path(uri).glob("part-*.parquet")}
        for stage, uri in (
            ("ingest", paths.ingested),
            ("decontaminate", paths.questions),
            ("distill", paths.raw),
        )
    }
    assert committed["ingest"] and committed["decontaminate"]
    # The failed shard's raw file holds its failed samples, marked incomplete: not done, redone.
    assert storage.Dataset(paths.raw).shard_info(BROKEN).extra["complete"] is False
    committed["distill"].pop(f"part-{BROKEN}.parquet")
    assert set(committed["distill"]) == {"part-pathvqa-00000.parquet", "part-pathvqa-00001.parquet"}

    s.down_sandbox = start_sandbox(port=s.down_port, latency_s=0.0)
    t_retry = time.time()
    answer = _retry_from_the_ui(s, created.id)
    assert answer["status"] == "ACCEPT", answer
    second = _wait_final(created.id, 240, s)
    assert second.state.type == StateType.COMPLETED, (second.state, (s.tmp / "serve.log").read_text()[-4000:])
    assert second.id == created.id and second.run_count >= 2

    # One run id: no new run folder, every "run <id>:" line of both tries names the same run.
    assert _run_folders(s) - before == {run_id}
    family = _family(created.id)
    said = {m.split(":")[0] for m in _logs([f.id for f in family]) if m.startswith("run ") and ":" in m}
    assert said == {f"run {run_id}"}, said
    # Every flow run of it (both tries, every stage) is named and tagged after the run id.
    assert {f.name for f in family} == {run_id}, sorted({f.name for f in family})
    assert all(run_tag(run_id) in f.tags for f in family)
    # No committed stage redone: the retry's shard tasks are the failed distill shard and the
    # stages that had not run yet (filter, mixture); the committed files are byte-identical.
    retried = [f.id for f in family if f.start_time is not None and f.start_time.timestamp() >= t_retry - 1]
    assert retried and len(retried) < len(family)
    names = {t.name for t in _task_runs(retried)}
    redone = {n for n in names if n.split(" ")[0] in ("ingest", "decontaminate", "distill")}
    assert redone == {f"distill {BROKEN}"}, sorted(names)
    for stage, files in committed.items():
        uri = {"ingest": paths.ingested, "decontaminate": paths.questions, "distill": paths.raw}[stage]
        now = {p.name: p.read_bytes() for p in Path(uri).glob("part-*.parquet")}
        assert {k: now[k] for k in files} == files, stage
    assert storage.Dataset(paths.raw).shard_info(BROKEN).extra["complete"] is True
    assert storage.Dataset(paths.mixture_train).num_rows() > 0
    print(f"UI retry test ({s.database}): {time.time() - t0:.0f} s")


def _read_everything(api: str) -> dict[str, list[str]]:
    """Every page of every collection the UI reads, plus each deployment and flow run in full."""
    import httpx

    out: dict[str, list[str]] = {}
    with httpx.Client(base_url=api, timeout=30) as http:

        def pages(name: str, path: str, body: dict[str, Any] | None = None) -> list[Any]:
            items: list[Any] = []
            while True:
                r = http.post(path, json=(body or {}) | {"limit": 200, "offset": len(items)})
                r.raise_for_status()
                out.setdefault(name, []).append(r.text)
                page = r.json()
                items += page
                if len(page) < 200:
                    return items

        for name, path in (
            ("flows", "/flows/filter"),
            ("task_runs", "/task_runs/filter"),
            ("logs", "/logs/filter"),
            ("artifacts", "/artifacts/filter"),
            ("variables", "/variables/filter"),
            ("automations", "/automations/filter"),
            ("work_pools", "/work_pools/filter"),
            ("concurrency_limits", "/v2/concurrency_limits/filter"),
        ):
            pages(name, path)
        pages("blocks", "/block_documents/filter", {"include_secrets": True})
        for fr in pages("flow_runs", "/flow_runs/filter"):
            for path in (f"/flow_runs/{fr['id']}", f"/flow_runs/{fr['id']}/graph-v2"):
                r = http.get(path)
                out.setdefault("flow_runs", []).append(r.text)
        for dep in pages("deployments", "/deployments/filter"):
            r = http.get(f"/deployments/{dep['id']}")
            out.setdefault("deployments", []).append(r.text)
        r = http.post("/events/filter", json={"limit": 50})
        while r.status_code == 200:
            out.setdefault("events", []).append(r.text)
            token = r.json().get("next_page")
            if not token:
                break
            r = http.get(token)
    assert out.get("events") and out.get("logs") and out.get("flow_runs")
    return out
