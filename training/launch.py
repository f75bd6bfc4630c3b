"""Start an SFT job the way a cluster would: a launcher command, one process per GPU, on one node.

The train flow calls :func:`launch_training`; it writes the :class:`TrainConfig` as YAML into the
job's work folder, runs ``torchrun`` (default) or ``deepspeed`` over ``python -m training.sft`` with
``--nproc_per_node`` processes, streams every output line to the caller's logger, and returns the
:class:`~training.sft.TrainResult` that rank 0 wrote. A failed job is one :class:`TrainingFailed`
line naming the launcher and the last error line, not a wall of worker tracebacks.

Several nodes go through Ray Train (``tasks/ray_train.py``), which starts the same
:func:`training.sft.train` in each worker.

``inprocess`` runs :func:`training.sft.train` in the calling process (one process, no launcher):
quick for a laptop or a test, but DeepSpeed then shares the flow's process.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from octomed_data.errors import ConfigError, OctomedError
from octomed_data.job_config import TrainConfig
from training.distributed import die_with_parent

Launcher = Literal["auto", "inprocess", "torchrun", "deepspeed"]
LAUNCHERS: tuple[str, ...] = ("auto", "inprocess", "torchrun", "deepspeed")

# Variables a launcher sets per process; inherited from a parent job they would confuse the child.
_DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


class TrainingFailed(OctomedError):
    """The training job exited with an error."""


def default_processes() -> int:
    """One process per visible GPU; one on a CPU-only machine."""
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _program(name: str) -> str:
    """The launcher script of this interpreter's environment (a venv's, not whatever is on PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def launch_command(
    config_path: str | Path,
    *,
    num_gpus: int,
    num_nodes: int = 1,
    launcher: str = "deepspeed",
    master_addr: str | None = None,
    master_port: int | None = None,
    hostfile: str | None = None,
    extra_args: Sequence[str] = (),
    local_programs: bool = False,
    module: str = "training.sft",
) -> list[str]:
    """The command line that runs ``module`` (SFT's ``training.sft``, GRPO's ``training.rl``) on
    ``num_gpus`` processes per node.

    The one builder: ``octomed-data train --launch-line`` prints it for a cluster, and
    :func:`start_job` runs it on this node (``local_programs``: the launcher scripts of this
    interpreter's environment; ``extra_args`` after the config, e.g. ``--result-file``).
    ``deepspeed`` reads a hostfile for multi-node runs (``--master_port`` only when given, or
    29500 across nodes); ``torchrun`` runs once per node with a c10d rendezvous at
    ``master_addr:master_port``, or ``--standalone`` (a private rendezvous on a free port) on one node.
    """
    if num_gpus < 1 or num_nodes < 1:
        raise ConfigError("num_gpus and num_nodes must be >= 1")
    program = _program if local_programs else str
    tail = [module, "--config", str(config_path), *extra_args]
    if launcher == "deepspeed":
        cmd = [program("deepspeed"), "--num_gpus", str(num_gpus)]
        if num_nodes > 1:
            if not hostfile or not master_addr:
                raise ConfigError("a multi-node deepspeed launch needs hostfile and master_addr")
            cmd += ["--num_nodes", str(num_nodes), "--hostfile", hostfile]
            cmd += ["--master_addr", master_addr, "--master_port", str(master_port or 29500)]
        elif master_port is not None:
            cmd += ["--master_port", str(master_port)]
        return cmd + ["--module", *tail]
    if launcher == "torchrun":
        cmd = [program("torchrun"), "--nproc_per_node", str(num_gpus), "--nnodes", str(num_nodes)]
        if num_nodes == 1:
            cmd.insert(1, "--standalone")  # private rendezvous on a free port: two jobs never collide
        else:
            if not master_addr:
                raise ConfigError("a multi-node torchrun launch needs master_addr")
            cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master_addr}:{master_port or 29500}"]
        return cmd + ["-m", *tail]
    raise ConfigError(f"unknown launcher {launcher!r} (deepspeed or torchrun)")


def preflight(config: TrainConfig) -> list[Any]:
    """Checks of what the job will need, so a wrong path (or data holding an API key) is one line
    before any process starts; returns the export's data files (``training.data.DataFile``)."""
    from octomed_data import storage
    from training.data import check_columns, refuse_secrets, resolve_data_files

    files = resolve_data_files(config.train_data)
    check_columns(files)
    refuse_secrets(files, config.secret_env_names)
    storage.ensure_writable(config.output_uri)
    model = config.model_path
    if "://" in model and not model.startswith("file://"):
        from training.checkpoints import read_checkpoint_marker

        read_checkpoint_marker(model)
    else:
        from training.models import check_model_path, is_hub_id

        path = Path(model.removeprefix("file://"))
        if path.exists() or not is_hub_id(model):
            check_model_path(str(path))
    return files


def start_job(
    config: TrainConfig, work_dir: str | Path, *, launcher: str, processes: int, progress: bool = False
) -> tuple[subprocess.Popen, Path]:
    """Start the launcher process (its own process group, output on one pipe); returns it and
    where rank 0 will write the result."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "train-config.yaml"
    result_path = work / "train-result.json"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    result_path.unlink(missing_ok=True)  # never report an earlier job's result
    tail = ["--result-file", str(result_path)] + ([] if progress else ["--no-progress"])
    cmd = launch_command(
        config_path,
        num_gpus=processes,
        launcher=launcher,
        master_port=_free_port() if launcher == "deepspeed" else None,
        extra_args=tail,
        local_programs=True,
    )
    try:
        proc = subprocess.Popen(
            cmd,
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # the whole job (launcher + workers) can be stopped as one group
            # Killed with the command that started it (kill -9 of `octomed-data train` included):
            # the launcher gets SIGTERM and stops its workers.
            preexec_fn=die_with_parent,
        )
    except FileNotFoundError:
        raise ConfigError(
            f"launcher {cmd[0]!r} not found; install torch/deepspeed in this environment"
        ) from None
    return proc, result_path


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    # The job must import this checkout's training package whether or not it is installed.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch_training(
    config: TrainConfig,
    *,
    work_dir: str | Path,
    launcher: str = "auto",
    processes: int | None = None,
    on_line: Callable[[str], None] | None = None,
    progress: bool = False,
    force: bool | None = None,
) -> dict[str, Any]:
    """Run one SFT job and return its TrainResult as a dict.

    Exactly once (:mod:`training.once`): a finished training of the same settings starts no process
    and returns its result (``trained_already``). ``force``: None (a library call, e.g. the recipe
    lab) trains other settings over a finished training, as ``train`` does; False refuses them in
    one line naming the settings that differ; True trains them into a folder of their own
    (``checkpoint_uri`` of the result says where). The command line and the train flow pass it.

    ``launcher``: ``auto`` (= ``torchrun``), ``torchrun``, ``deepspeed`` or ``inprocess``.
    ``processes``: processes on this node (default: one per GPU, 1 on CPU). ``on_line`` receives
    every output line of the job (a Prefect logger's ``info`` in the flow).
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    processes = processes or default_processes()
    if processes < 1:
        raise ConfigError(f"processes must be >= 1, got {processes}")
    config.batch_plan(processes)  # a batch the job can't reach fails here, before anything starts
    files = preflight(config)
    from training.once import finished_result, prior_training, route_output

    manifest = [{"uri": f.uri, "rows": f.rows} for f in files]
    if force is not None:
        config, what = route_output(config, manifest, force=force)
        if on_line is not None:
            on_line(what)
    prior = prior_training(config, manifest)
    if prior.state == "done":  # nothing to train: no process is started
        if on_line is not None and force is None:  # route_output said it otherwise
            on_line(
                f"{config.output_uri} is trained already with these settings (step {prior.step}): nothing trained"
            )
        rows = sum(f.rows for f in files)
        return finished_result(prior, rows) | {"checkpoint_uri": config.output_uri}
    if launcher == "inprocess":
        if processes != 1:
            raise ConfigError("the inprocess launcher runs one process; use torchrun for several")
        from training.sft import train

        return train(config, progress=progress).to_dict()
    launcher = "torchrun" if launcher == "auto" else launcher
    proc, result_path = start_job(config, work_dir, launcher=launcher, processes=processes, progress=progress)
    tail: collections.deque[str] = collections.deque(maxlen=60)
    root_cause: str | None = None  # the first worker failure: later lines are the launcher's echo
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            root_cause = root_cause or _root_cause(line)
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    except BaseException:
        # Cancelled flow run or Ctrl-C: stop every worker, not just the launcher.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        raise
    if rc != 0 or not result_path.is_file():
        raise TrainingFailed(
            f"training job ({launcher}, {processes} process(es)) exited with code {rc}: "
            f"{(root_cause or _last_error(tail))[:500]}"
        )
    return json.loads(result_path.read_text())


_RANK_ERROR = re.compile(r"^\[rank\d+\]:\s+(?P<msg>[\w.]*(?:Error|Exception|Exit)\w*:.*)$")


def _root_cause(line: str) -> str | None:
    """A worker's own failure in one line: its ``error:`` line or the exception a rank died of."""
    if line.startswith("error: ") or "]: error: " in line:
        return line[line.index("error: ") + len("error: ") :].strip()
    m = _RANK_ERROR.match(line.strip())
    return m.group("msg").strip() if m else None


def _last_error(lines: collections.deque[str]) -> str:
    """The most telling line of a failed job when no worker named its own error."""
    for line in reversed(lines):
        stripped = line.strip()
        if stripped and (stripped.split(":")[0].endswith(("Error", "Exception")) or "Error:" in stripped):
            return stripped[-400:]
    return next((s.strip()[-400:] for s in reversed(lines) if s.strip()), "no output")
