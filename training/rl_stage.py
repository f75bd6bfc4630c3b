"""GRPO after SFT as a stage, exactly once per (SFT checkpoint, RL data commit, settings).

:class:`RLStage` is :class:`training.stage.TrainStage` (the same record, lease and no-op rules)
keyed by the RL job's ``config_hash`` (:meth:`training.rl.RLJob.config_hash`: the trainer
settings, the reward's settings, the SFT checkpoint's marker and the RL data's content hash)
instead of the TRL export: done is ``state/rl/<config_hash>.json`` COMPLETED, so a second trigger
trains nothing. The job holds the run's checkpoint-folder lease while it trains, so the SFT
checkpoint it starts from is not retrained under it.

:func:`rl_job` builds the job from the run and its recipe; :func:`launch_rl` runs it in this
process (``inprocess``, the CPU smoke) or as ``python -m training.rl`` under ``torchrun`` or
``deepspeed`` like SFT (``training.launch.launch_command``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.layout import CheckpointFolder, RLFolder, RunPaths
from octomed_data.recipe import Recipe
from octomed_data.runs import new_owner
from octomed_data.stages import Stage
from training.rl import RLFailed, RLJob
from training.stage import TRAIN_LEASE_WAIT_S, TrainStage

SPLITS = ("train", "validation")
# Variables a launcher sets per process: inherited from a parent job they would confuse the child.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rl_data_fingerprint(paths: RunPaths) -> str:
    """The content hash of the run's RL prompts (both splits); ConfigError when there are none."""
    rl = RLFolder(paths.rl)
    digest = hashlib.sha256()
    found = False
    for split in SPLITS:
        ds = storage.Dataset(rl.split(split))
        for name, info in sorted(ds.manifest().items()):
            found = found or split == "train"
            digest.update(f"{split}/{name}/{info.rows}\n".encode())
            storage.update_digest(digest, storage.join(ds.uri, info.file))
    if not found:
        raise ConfigError(f"run {paths.run_id!r} has no RL prompts at {rl.data}: build the RL data first")
    return digest.hexdigest()[:16]


def sft_identity(checkpoint_uri: str) -> dict[str, Any]:
    """What identifies the SFT checkpoint the policy starts from: its marker's hash and time."""
    marker_uri = CheckpointFolder(checkpoint_uri).marker
    if not storage.exists(marker_uri):
        raise ConfigError(f"no finished SFT checkpoint at {checkpoint_uri}: train the run first")
    marker = storage.read_json(marker_uri)
    return {
        "uri": checkpoint_uri,
        "config_hash": marker.get("config_hash"),
        "created_at": marker.get("created_at"),
        "step": marker.get("step"),
    }


def judge_of(recipe: Recipe) -> dict[str, Any] | None:
    """The recipe's judge teacher as the filter resolves it (no key: the job reads its env
    variable), or None when no source is judged; a sandbox-bound judge is one ConfigError line
    (the GRPO job starts no sandbox teacher)."""
    from octomed_data.stages.filter import recipe_judge
    from octomed_data.teachers import is_simulated

    teacher = recipe_judge(recipe)
    if teacher is None:
        return None
    if is_simulated(teacher):
        raise ConfigError(
            "rl: the recipe's verify settings send open answers to the LLM judge, and the judge is the "
            "sandbox teacher, which the GRPO job does not start; give the judge teacher a base_url "
            "(or $OCTOMED_TEACHER_BASE_URL): nothing was trained"
        )
    return teacher.model_dump(mode="json")


def check_rewards(recipe: Recipe) -> None:
    """The reward the recipe's ``verify:`` settings ask for can be computed by the GRPO job (else one line)."""
    judge_of(recipe)


def rl_job(
    recipe: Recipe,
    paths: RunPaths,
    *,
    sft_checkpoint: str,
    work_dir: str,
    overrides: dict[str, Any] | None = None,
) -> RLJob:
    """The run's GRPO job: its SFT checkpoint as the policy, its RL prompts, the recipe's settings
    (``rl.trainer``, then ``overrides``), the recipe's ``verify:`` settings for the reward."""
    judge = judge_of(recipe)
    rl = RLFolder(paths.rl)
    trainer = recipe.rl.trainer.model_dump(mode="json") | {
        k: v for k, v in (overrides or {}).items() if v is not None
    }
    type(recipe.rl.trainer).model_validate(trainer)  # an override out of range is one line
    return RLJob(
        model_uri=sft_checkpoint,
        data_uri=rl.split("train"),
        output_uri=rl.checkpoints,
        metrics_uri=rl.metrics,
        plot_uri=rl.plot,
        work_dir=work_dir,
        trainer=trainer,
        verify=recipe.verify.model_dump(mode="json"),
        format_weight=recipe.rl.format_reward,
        inputs={"sft": sft_identity(sft_checkpoint), "rl_data": rl_data_fingerprint(paths)},
        judge=judge,
        judge_journal=rl.judge if judge else None,
        max_pixels=recipe.training.config.max_pixels,  # image prompts at SFT's image size
    )


class RLStage(TrainStage):
    """One GRPO job on the run's RL prompts, once per (SFT checkpoint, RL data, settings)."""

    name = "rl"
    global_step = True

    def __init__(
        self,
        paths: RunPaths,
        rl_job: RLJob,
        job: Callable[[], dict[str, Any]],
        *,
        owner: str | None = None,
        wait_s: float = TRAIN_LEASE_WAIT_S,
        rerun: bool = False,
    ) -> None:
        Stage.__init__(self, paths)  # not TrainStage's: its input is the RL job, not the TRL export
        self.job = job
        self.rerun = rerun
        self.config_hash = rl_job.config_hash()
        self.export = self.config_hash  # what the stage is done for (TrainStage's messages name it)
        self.key = f"{paths.run_id}:rl:{self.config_hash}"
        self.owner = f"{self.key}|{owner or new_owner()}"
        self.wait_s = wait_s

    @property
    def record_uri(self) -> str:
        return self.paths.state_uri("rl", self.config_hash)


def launch_rl(
    job: RLJob,
    *,
    launcher: str = "inprocess",
    processes: int | None = None,
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the GRPO job: in this process, or ``python -m training.rl`` under a launcher (``auto``
    = ``torchrun``) with one process per GPU; returns the job's result (a finished job of these
    settings starts no process: ``trained_already``)."""
    from training.launch import default_processes, launch_command
    from training.rl import finished, train_grpo

    done = finished(job)
    if done is not None:
        if on_line is not None:
            on_line(f"{job.output_uri} is trained already with these settings: nothing trained")
        return done
    processes = processes or default_processes()
    if launcher == "inprocess":
        if processes != 1:
            raise ConfigError("the inprocess launcher runs one process; use torchrun for several")
        return train_grpo(job)
    launcher = "torchrun" if launcher == "auto" else launcher
    work = Path(job.work_dir) / "job"
    work.mkdir(parents=True, exist_ok=True)
    config_path, result_path = work / "rl-job.json", work / "rl-result.json"
    config_path.write_text(job.model_dump_json(indent=2))
    result_path.unlink(missing_ok=True)
    cmd = launch_command(
        config_path,
        num_gpus=processes,
        launcher=launcher,
        extra_args=["--result-file", str(result_path), "--no-progress"],
        local_programs=True,
        module="training.rl",
    )
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(line.rstrip("\n"))
        rc = proc.wait()
    if rc != 0 or not result_path.is_file():
        last = next((t for t in reversed(tail) if t.startswith("error: ") or "Error" in t), None)
        raise RLFailed(
            f"GRPO job ({launcher}, {processes} process(es)) exited with code {rc}: {last or 'no output'}"
        )
    return json.loads(result_path.read_text())
