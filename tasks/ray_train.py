"""Multi-node SFT through Ray Train: the same :func:`training.sft.train` in every Ray worker.

``TorchTrainer`` places ``num_workers`` workers across the cluster (one per GPU with ``use_gpu``),
sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR in each and starts the process group (NCCL on GPUs,
gloo on CPUs); DeepSpeed and the HF Trainer find it already initialised and join it. Checkpoints
and the final model go to ``config.output_uri`` exactly as with ``torchrun`` (the object store is
what nodes share), and rank 0's :class:`~training.sft.TrainResult` comes back as the result.

Where Ray runs is Ray's business: ``address`` (or ``RAY_ADDRESS``) names a cluster; without one a
local Ray is started.
"""

from __future__ import annotations

import os
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.job_config import TrainConfig
from training.launch import TrainingFailed

RESULT_FILE = "train-result.json"


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: one rank of the SFT job."""
    import ray.train

    from training.sft import train

    config = TrainConfig.model_validate(loop_config["config"])
    result = train(config, progress=False)
    # Which Ray node each rank ran on (index = rank): where a multi-node job really went.
    nodes = _gather(ray.get_runtime_context().get_node_id())
    if ray.train.get_context().get_world_rank() == 0:
        # Through the store the driver can read wherever it runs (Ray Train keeps metrics only
        # with reported checkpoints, and the checkpoint is ours, on the object store).
        storage.write_json(loop_config["result_uri"], {**result.to_dict(), "nodes": nodes})


def _gather(value: str) -> list[str]:
    """``value`` from every rank, in rank order (the process group Ray Train started)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def train_on_ray(
    config: TrainConfig,
    *,
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Run one SFT job on Ray Train workers; returns rank 0's TrainResult dict, plus ``nodes``: the
    Ray node ID each rank ran on (index = rank).

    ``use_gpu`` and ``num_workers`` default to what the *cluster* has (one worker per GPU, or one
    CPU worker on a cluster without GPUs), not to what the machine submitting the job has.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        try:
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=False)
        except ConnectionError as exc:
            raise ConfigError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    if use_gpu is None:
        use_gpu = cluster_gpus > 0
    if num_workers is None:
        num_workers = cluster_gpus if use_gpu else 1
    if num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    if use_gpu and num_workers > cluster_gpus:
        raise ConfigError(
            f"{num_workers} GPU workers asked for, but the Ray cluster has {cluster_gpus} GPU(s)"
        )
    config.batch_plan(num_workers)  # an unreachable global batch fails before workers start
    result_uri = storage.join(config.output_uri, RESULT_FILE)
    if storage.exists(result_uri):  # never return an earlier job's result
        fs, path = storage.filesystem(result_uri)
        fs.rm(path)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "result_uri": result_uri},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(name="octomed-sft", storage_path=storage_path),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError wraps the worker's exception
        cause = exc.__cause__ or exc
        line = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise TrainingFailed(f"Ray Train job ({num_workers} workers) failed: {line[:500]}") from None
    if result.error is not None:
        raise TrainingFailed(f"Ray Train job ({num_workers} workers) failed: {result.error}")
    if not storage.exists(result_uri):
        raise TrainingFailed(f"Ray Train job ({num_workers} workers) ended without a result at {result_uri}")
    return storage.read_json(result_uri)
