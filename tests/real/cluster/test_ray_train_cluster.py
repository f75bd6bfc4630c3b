"""Ray Train SFT on a real two-node Ray cluster on loopback (two ``ray start`` raylets, 1 CPU each,
each node with its own local temp folder, as separate machines have): one worker per node, ZeRO-3
checkpoints on the loopback S3 server; the worker node is SIGKILLed mid-run after the first
checkpoint reached S3, a replacement node joins, and the re-submitted job resumes from S3 with
the uninterrupted run's losses, step for step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from octomed_data import storage
from octomed_data.export import LLAMAFACTORY_SCHEMA
from octomed_data.job_config import TrainConfig
from tests.support.net import free_port
from tests.support.ray_cluster import RAY
from tests.support.ray_cluster import node_env as _node_env
from tests.support.ray_cluster import stop_own_raylets as _stop_own_raylets
from tests.support.sft import training_rows

# Long enough that the killed job cannot finish between checkpoint-2 and the kill on an idle machine.
STEPS = 20


class LoopbackCluster:
    """A head raylet (127.0.0.1) and worker raylets (127.0.0.2, ...), each node with its own TMPDIR (so its own
    SFT work folder: ZeRO shards are written, uploaded and downloaded per node, as on separate disks)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.temp = f"/tmp/ray-rt-{os.getpid()}"  # Ray's session folder; every process of ours names it
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workers: list[subprocess.Popen] = []
        self.common = ["--num-cpus", "1", "--disable-usage-stats"]

    def env(self, node: str) -> dict[str, str]:
        local = self.tmp / f"node-{node}"  # this node's "local disk"
        local.mkdir()
        # A dead raylet is noticed after 3 missed 1 s health checks (default: 5 x 3 s).
        health = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        return _node_env(self.tmp) | health | {"TMPDIR": str(local)}

    def start_head(self) -> None:
        subprocess.run(
            [RAY, "start", "--head", "--port", str(self.port), "--include-dashboard=false"]
            + [f"--temp-dir={self.temp}", "--node-ip-address", "127.0.0.1", *self.common],
            env=self.env("head"),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def add_worker(self) -> subprocess.Popen:
        import ray

        alive = len(self.alive())
        # Its own loopback address: Ray Train numbers local ranks per node IP, so two nodes on
        # 127.0.0.1 would be one host to it (LOCAL_RANK 0 and 1), not two machines.
        ip = f"127.0.0.{2 + len(self.workers)}"
        proc = subprocess.Popen(
            [RAY, "start", "--address", self.address, "--block", "--node-ip-address", ip, *self.common],
            env=self.env(f"worker{len(self.workers)}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: raylet and its workers die together
        )
        self.workers.append(proc)
        deadline = time.time() + 60
        while len(self.alive()) < alive + 1 and time.time() < deadline:
            time.sleep(0.5)
        assert len(self.alive()) == alive + 1, ray.nodes()
        return proc

    @staticmethod
    def alive() -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        _stop_own_raylets(self.temp)


@pytest.fixture
def cluster(tmp_path, s3_endpoint):
    """Head + one worker node; the nodes get the loopback S3 credentials in their environment."""
    import ray

    from tasks.ray_executor import RayPool

    if ray.is_initialized():
        RayPool.reset()
        ray.shutdown()
    nodes = LoopbackCluster(tmp_path)
    try:
        nodes.start_head()
        ray.init(address=nodes.address, log_to_driver=False)
        nodes.add_worker()
        yield nodes
    finally:
        ray.shutdown()
        nodes.stop()


def _config(export_uri: str, model: Path, output_uri: str, save_steps: int) -> TrainConfig:
    return TrainConfig(
        train_data=[export_uri],
        model_path=str(model),
        output_uri=output_uri,
        global_batch_size=8,
        per_device_batch_size=2,  # x 2 workers -> gradient accumulation 2
        max_steps=STEPS,
        learning_rate=2e-3,
        lr_scheduler_type="constant",  # step t's loss depends only on steps before it
        warmup_ratio=0.0,
        max_seq_len=256,
        zero_stage=3,
        logging_steps=1,
        save_steps=save_steps,  # outside the config hash: a resume may save less often
    )


# Three 20-step ZeRO-3 runs on two 1-CPU raylets: ~5 min on an idle 2-core machine, over 10 min on a
# loaded CI (where pytest-timeout's default 600 s once cut the resumed run short as it finished).
@pytest.mark.timeout(1200)
def test_ray_train_one_worker_per_node_survives_a_dead_node_and_resumes_from_s3(cluster, s3_bucket, tmp_path):
    from tasks.ray_train import train_on_ray
    from training.launch import TrainingFailed
    from training.tiny import build_text_model

    model = build_text_model(tmp_path / "tiny")
    export = storage.Dataset(str(tmp_path / "export"), LLAMAFACTORY_SCHEMA)
    export.write_shard(0, training_rows(16))

    def run(name: str, save_steps: int = STEPS // 2) -> dict:
        # Only the run that is killed checkpoints every 2 steps (so one is on S3 early); the others
        # upload ZeRO-3 states twice, not ten times.
        config = _config(export.uri, model, f"{s3_bucket}/{name}", save_steps)
        return train_on_ray(config, num_workers=2, storage_path=str(tmp_path / "ray"))

    # 1. Uninterrupted reference: two workers (1 CPU each on 1-CPU nodes), one on each node.
    head = {ray_head_node()}
    ref_started = time.time()
    ref = run("reference")
    ref_seconds = time.time() - ref_started
    assert ref["steps"] == STEPS and ref["resumed_from_step"] == 0 and len(ref["losses"]) == STEPS
    assert sorted(ref["nodes"]) == sorted(cluster.alive()) and len(set(ref["nodes"])) == 2
    (worker_node,) = set(ref["nodes"]) - head
    marker = storage.read_json(f"{s3_bucket}/reference/checkpoints/checkpoint-10/checkpoint.json")
    # Each node uploaded its own rank's ZeRO-3 optimizer shard from its own local work folder.
    assert marker["world_size"] == 2
    assert len([f for f in marker["files"] if f.startswith("global_step10/") and "optim_states" in f]) == 2

    # 2. SIGKILL the worker node (raylet + its Ray Train worker) once checkpoint-2 is on S3.
    killed_at: list[float] = []
    first_marker = f"{s3_bucket}/killed/checkpoints/checkpoint-2/checkpoint.json"

    def kill_after_first_checkpoint() -> None:
        # Checkpoint-2 comes a tenth of the way into a run like the reference; on a loaded CI the
        # reference itself can take minutes, so wait up to three reference runs, never under 150 s.
        deadline = time.time() + max(150.0, 3 * ref_seconds)
        while time.time() < deadline and not storage.exists(first_marker):
            time.sleep(0.1)
        killed_at.append(time.time())
        os.killpg(cluster.workers[0].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    with pytest.raises(TrainingFailed, match=r"Ray Train job \(2 workers\) failed"):
        run("killed", save_steps=2)
    killer.join()
    assert killed_at and storage.exists(first_marker)
    assert not storage.exists(f"{s3_bucket}/killed/checkpoint.json")  # it never finished
    assert time.time() - killed_at[0] < 150  # the dead node fails the job; it does not hang
    deadline = time.time() + 60  # the head notices the dead raylet after missed health checks
    while worker_node in cluster.alive() and time.time() < deadline:
        time.sleep(0.5)
    assert cluster.alive() == head

    # 3. A replacement node joins; the re-submitted job resumes from S3 on both nodes.
    cluster.add_worker()
    replacement = cluster.alive() - head
    assert len(replacement) == 1 and worker_node not in replacement
    resumed = run("killed")
    k = resumed["resumed_from_step"]
    assert (
        k % 2 == 0
        and 2 <= k < STEPS
        and resumed["steps"] == STEPS
        and resumed["samples_seen"] == (STEPS - k) * 8
    )
    assert set(resumed["nodes"]) == head | replacement and len(resumed["nodes"]) == 2
    # Same data order and state: every step after the resume has the reference's loss (the steps
    # before it come from the checkpoint's trainer state).
    np.testing.assert_allclose(resumed["losses"], ref["losses"], rtol=1e-5)
    final = storage.read_json(f"{s3_bucket}/killed/checkpoint.json")
    assert final["final"] and final["step"] == STEPS and final["world_size"] == 2


def ray_head_node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()  # the driver is connected through the head node
