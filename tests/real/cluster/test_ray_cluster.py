"""A real two-node Ray cluster on loopback (two ``ray start`` raylets, as on a cluster): distillation
spreads over both nodes with the teacher's key only in the driver's environment, and killing the
worker node mid-shard still ends with exactly N samples per question, no stored sample re-requested.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.runs import shard_states
from tests.support.distill import config, make_questions
from tests.support.net import free_port
from tests.support.ray_cluster import KEY_ENV, RAY
from tests.support.ray_cluster import node_env as _node_env
from tests.support.ray_cluster import stop_own_raylets as _stop_own_raylets

SAMPLES = 2
LATENCY = 0.25


@pytest.fixture
def cluster(tmp_path):
    """Head + worker raylets (1 CPU each) on 127.0.0.1; yields (address, worker process)."""
    import ray

    from tasks.ray_executor import RayPool

    if ray.is_initialized():
        RayPool.reset()
        ray.shutdown()
    port = free_port()
    env = _node_env(tmp_path)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    temp = f"/tmp/ray-real-{os.getpid()}"
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--port",
            str(port),
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            *common,
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    worker = subprocess.Popen(
        [RAY, "start", "--address", f"127.0.0.1:{port}", "--block", *common],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    ray.init(address=address, log_to_driver=False)
    deadline = time.time() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    _warm_up_every_node(ray)
    try:
        yield address, worker
    finally:
        RayPool.reset()
        ray.shutdown()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        _stop_own_raylets(temp)


def _warm_up_every_node(ray) -> None:
    """Run one task pinned to each node: a raylet that registered but cannot start workers yet would
    otherwise send soft-affinity actors to the head (a busy machine makes that likely)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    for node in [n["NodeID"] for n in ray.nodes() if n["Alive"]]:
        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        assert ray.get(where.options(scheduling_strategy=strategy).remote(), timeout=120) == node


def _stage(tmp: Path, name: str, base_url: str, shards: int, per_shard: int):
    from octomed_data.stages.distill import DistillStage
    from octomed_data.teachers import resolve_api_key

    q = str(tmp / name / "questions")
    for s in range(shards):
        make_questions(q, per_shard, shard=f"{s:05d}", offset=s * per_shard)
    cfg = config(
        base_url,
        samples=SAMPLES,
        teacher={"name": "remote", "api_key_env": KEY_ENV, "max_in_flight": 2, "server": "openai"},
    )
    out = str(tmp / name / "run")
    # The key is resolved here, in the driver (the only process that has it), as the flows do.
    return DistillStage(
        RunPaths.at(out),
        cfg,
        questions=q,
        out=out,
        api_keys={t.name: resolve_api_key(t) for t in cfg.teachers},
    ), q


def test_distill_spreads_over_two_nodes_key_only_in_driver_and_survives_a_dead_node(
    cluster, tmp_path, monkeypatch
):
    import ray

    from octomed_data.sandbox import start_sandbox
    from octomed_data.stages import run_stage
    from tasks.ray_executor import RayExecutor

    address, worker = cluster
    monkeypatch.setenv(KEY_ENV, "sk-canary-only-in-driver-000000001")
    sandbox = start_sandbox(latency_s=LATENCY)
    try:
        # 1. Spread: both nodes run shards; no node has the key in its environment.
        stage, _ = _stage(tmp_path, "spread", sandbox.base_url, shards=4, per_shard=3)
        result = run_stage(stage, RayExecutor(address), finalize=False)
        assert not result.failed, result.failed
        nodes = {s["shard"]: s.get("node_id") for s in shard_states(stage.paths, "distill")}
        # Every shard ran on a node of this cluster (recorded per shard), and both nodes ran shards:
        # the pool pins one worker per node (hard affinity) and deals shards out in turn.
        assert None not in nodes.values(), nodes
        assert set(nodes.values()) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}, nodes

        # 1b. Beyond one machine (issue 26): the filter (sharded) and the mixture (a global step)
        #     run on the cluster's actors and give the same rows as the local executor.
        _same_rows_on_ray_and_locally(tmp_path, address)

        # 2. The worker node dies mid-shard: Ray restarts the actor on the head node and retries;
        #    the journal keeps what was stored, so every question ends with exactly N samples.
        #    Only its raylet is killed (a raylet crash): `ray start --block` then ends every other
        #    process of that node (a daemonized `ray start` leaves its log_monitor behind).
        import psutil

        node_procs = psutil.Process(worker.pid).children(recursive=True)
        raylet = next(p for p in node_procs if "raylet/raylet" in " ".join(p.cmdline()))
        before = len(sandbox.stats()["log"])
        stage, q = _stage(tmp_path, "kill", sandbox.base_url, shards=4, per_shard=6)
        killed_at: list[float] = []

        def kill_when_busy() -> None:
            deadline = time.time() + 60
            while time.time() < deadline and len(sandbox.stats()["log"]) - before < 12:
                time.sleep(0.02)
            killed_at.append(time.time())
            raylet.kill()

        import threading

        killer = threading.Thread(target=kill_when_busy, daemon=True)
        killer.start()
        result = run_stage(stage, RayExecutor(address), finalize=False)
        killer.join()
        assert killed_at, "the worker node was never killed"
        assert not result.failed, result.failed
        from octomed_data.distill import raw_uri

        raw = storage.Dataset(raw_uri(str(tmp_path / "kill" / "run"))).read_all().to_pylist()
        per_question = Counter(r["question_id"] for r in raw)
        assert len(per_question) == 4 * 6 and set(per_question.values()) == {SAMPLES}
        # A key requested twice was in flight (or replied, not yet journalled) when the node died:
        # never a sample stored before the kill.
        log = sandbox.stats()["log"][before:]
        first: dict[str, float] = {}
        repeats = []
        for entry in log:
            if entry["key"] in first:
                repeats.append(first[entry["key"]])
            else:
                first[entry["key"]] = entry["t"]
        for t in repeats:
            assert t >= killed_at[0] - (LATENCY + 2.0), (
                "a sample stored well before the kill was requested again"
            )
        assert len(repeats) <= 2 * 2 * 2  # at most the dead node's in-flight requests (2 shards x 2)
        # Nothing of the killed node is left running (log_monitor, agents, workers).
        deadline = time.time() + 30
        while time.time() < deadline and any(_running(p) for p in node_procs + [psutil.Process(worker.pid)]):
            time.sleep(0.5)
        left = [" ".join(p.cmdline())[:80] for p in node_procs if _running(p)]
        assert not left and worker.poll() is not None, left
    finally:
        sandbox.stop()


def _same_rows_on_ray_and_locally(tmp_path: Path, address: str) -> None:
    from octomed_data.distill import raw_uri
    from octomed_data.stages import LocalExecutor, raise_for_failures, run_stage
    from octomed_data.stages.filter import FilterStage
    from octomed_data.stages.mixture import MixtureStage
    from tasks.ray_executor import RayExecutor

    raw = raw_uri(str(tmp_path / "spread" / "run"))  # the distill stage above wrote its raw here
    questions = str(tmp_path / "spread" / "questions")
    rows: dict[str, dict[str, list]] = {}
    for name, executor in (("ray", RayExecutor(address)), ("local", LocalExecutor(progress=False))):
        paths = RunPaths.at(str(tmp_path / f"global-{name}"))
        filtered = run_stage(FilterStage(paths, raw=raw, questions=questions), executor)
        raise_for_failures(filtered)
        assert len(filtered.outcomes) == 4 and {o.state for o in filtered.outcomes.values()} == {"COMPLETED"}
        mixed = run_stage(MixtureStage(paths, questions=questions), executor)
        raise_for_failures(mixed)
        rows[name] = {
            uri: storage.Dataset(getattr(paths, uri)).read_all().sort_by(keys).to_pylist()
            for uri, keys in (
                ("verdicts", [("question_id", "ascending"), ("sample_idx", "ascending")]),
                ("accepted", [("question_id", "ascending"), ("sample_idx", "ascending")]),
                ("mixture_train", [("shuffle_key", "ascending")]),
                ("mixture_validation", [("shuffle_key", "ascending")]),
            )
        }
    assert rows["ray"]["verdicts"] and rows["ray"]["mixture_train"]
    for uri in rows["local"]:
        assert rows["ray"][uri] == rows["local"][uri], uri


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _shard_worker_processes() -> list:
    """This machine's Ray actor processes running a ShardWorker (their title is ``ray::ShardWorker...``)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (proc.info["cmdline"] or [""])[0].startswith("ray::ShardWorker") and _running(proc):
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _files_written(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def test_kill_9_of_the_driver_leaves_no_actor_writing_and_a_restart_completes_exactly(cluster, tmp_path):
    """Defect 9: Ray actors outlived a killed flow and kept requesting and writing. The driver (the
    CLI here, the flow's process in a deployment) is killed with SIGKILL mid-shard: its shard actors
    die with it (no ShardWorker process left, no request, no write afterwards), and a restart at once
    takes the shards over (leases, epoch fencing) and ends with exactly N samples per question."""
    import yaml

    from octomed_data.distill import raw_uri
    from octomed_data.sandbox import start_sandbox
    from tasks.ray_executor import RayPool

    address, _ = cluster
    RayPool.reset()  # this test process's own actors are not the driver's (killed; may linger a moment)
    earlier = {p.pid for p in _shard_worker_processes()}
    sandbox = start_sandbox(latency_s=LATENCY)
    try:
        q = str(tmp_path / "questions")
        for s in range(4):
            make_questions(q, 10, shard=f"{s:05d}", offset=s * 10)
        cfg = tmp_path / "distill.yaml"
        teacher = {"name": "remote", "base_url": sandbox.base_url, "model": "sandbox-r1"}
        teacher.update(api_key_env=KEY_ENV, max_in_flight=2, server="openai")
        cfg.write_text(
            yaml.safe_dump(
                {"teachers": [teacher], "samples": SAMPLES, "flush_interval_s": 0.05, "flush_every": 4}
            )
        )
        out = tmp_path / "run"
        cmd = [str(Path(sys.executable).with_name("octomed-data")), "distill", q, "--out", str(out)]
        cmd += ["--config", str(cfg), "--executor", "ray", "--address", address, "--no-progress"]
        env = _node_env(tmp_path) | {KEY_ENV: "sk-canary-driver-only-000000002"}

        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and len(sandbox.stats()["log"]) < 16 and driver.poll() is None:
            time.sleep(0.02)
        assert driver.poll() is None, driver.stdout.read()[-3000:]
        actors = [p for p in _shard_worker_processes() if p.pid not in earlier]
        assert actors, "the driver's shard actors were not found"
        driver.kill()  # SIGKILL: no cleanup of any kind in the driver
        killed_at = time.time()
        driver.wait()

        # Its actors go with it; then nothing more is requested or written.
        deadline = time.time() + 30
        while time.time() < deadline and any(_running(p) for p in actors):
            time.sleep(0.2)
        gone_at = time.time()
        assert not any(_running(p) for p in actors), "shard actors outlived their killed driver"
        requests, files = len(sandbox.stats()["log"]), _files_written(out)
        time.sleep(3 * 3)  # three lease TTLs (OCTOMED_SHARD_LEASE_TTL_S=3 on these nodes)
        assert len(sandbox.stats()["log"]) == requests, "requests after the driver's actors were gone"
        assert _files_written(out) == files, "store writes after the driver's actors were gone"
        late = [t for t in (e["t"] for e in sandbox.stats()["log"]) if t > gone_at]
        assert not late
        print(f"actors gone {gone_at - killed_at:.1f} s after kill -9 of the driver")

        # A restart at once finishes the run: exactly N samples per question, none stored re-requested.
        from octomed_data.distill.journal import read_done_keys

        stored = sum(len(read_done_keys(str(out), f"{s:05d}")[0]) for s in range(4))
        assert 0 < stored < 40 * SAMPLES
        stored_before = len(sandbox.stats()["log"])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        raw = storage.Dataset(raw_uri(str(out))).read_all().to_pylist()
        per_question = Counter(r["question_id"] for r in raw)
        assert len(per_question) == 40 and set(per_question.values()) == {SAMPLES}
        # One request per missing sample (no faults here): nothing stored before was paid for again.
        assert len(sandbox.stats()["log"]) - stored_before == 40 * SAMPLES - stored
    finally:
        sandbox.stop()
