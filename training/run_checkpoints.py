"""The checkpoints of one SFT run: resuming from the newest uploaded intermediate checkpoint it
may continue (:func:`training.once.resumable`), finishing a job from its last checkpoint, and
saving the final one (``checkpoint.json`` last)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.job_config import TrainConfig
from octomed_data.layout import CheckpointFolder
from training.checkpoints import (
    download_folder,
    intermediate_checkpoints,
    upload_folder,
    write_checkpoint_marker,
)
from training.once import ENV_KILL_BEFORE_FINAL_MARKER, resumable

log = logging.getLogger(__name__)

# What an intermediate checkpoint holds besides the model: never part of a final one.
_TRAINER_STATE = ("trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "latest")


def latest_resumable(
    config: TrainConfig, data_manifest: list[dict[str, Any]]
) -> tuple[str, dict[str, Any]] | None:
    """The newest uploaded intermediate checkpoint this job may continue (URI, marker), if any."""
    found = []
    for step, uri, marker in intermediate_checkpoints(config.output_uri):
        if resumable(marker, config, data_manifest):
            found.append((step, uri, marker))
        else:
            log.info("not resuming from %s: other settings, data or a later step", uri.rsplit("/", 1)[-1])
    if not found:
        return None
    _, uri, marker = max(found, key=lambda f: f[0])
    return uri, marker


def resume_checkpoint(found: tuple[str, dict[str, Any]] | None, work_dir: Path, args: Any) -> Path | None:
    """The checkpoint :func:`latest_resumable` found, downloaded (every node); None if none."""
    if not found:
        return None
    uri, marker = found
    resume_from = work_dir / "resume" / f"checkpoint-{marker['step']}"
    # Every node needs the checkpoint on local disk (DeepSpeed reads its own shards).
    with args.main_process_first(local=True, desc="download checkpoint"):
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            download_folder(uri, marker["files"], resume_from)
    log.info("resuming from %s (step %s)", uri, marker["step"])
    return resume_from


def remove_final_marker(output_uri: str) -> None:
    """Un-finish ``output_uri`` before training into it again (an extension, other settings)."""
    marker = CheckpointFolder(output_uri).marker
    if storage.exists(marker):
        fs, path = storage.filesystem(marker)
        fs.rm(path)


def finalize_from_checkpoint(
    config: TrainConfig, found: tuple[str, dict[str, Any]], work_dir: Path, *, rows: int
) -> dict[str, Any]:
    """A job whose last intermediate checkpoint is at ``max_steps`` (killed before its final
    marker): rank 0 makes that checkpoint's model (weights, config, tokenizer, processor) the final
    one, marker last; no step is trained. Returns the run's result fields."""
    uri, marker = found
    log.info("finishing from %s (step %s): its model is the final one; nothing trained", uri, marker["step"])
    result = {
        "checkpoint_uri": config.output_uri,
        "steps": int(marker["step"]),
        "final_loss": marker.get("loss"),
        "mean_loss": None,
        "samples_seen": 0,
        "rows": rows,
        "resumed_from_step": int(marker["step"]),
        "examples_per_step": marker.get("examples_per_step"),
        "packing": marker.get("packing"),
    }
    if int(os.environ.get("RANK", "0")) != 0:
        return result
    model_files = [
        f
        for f in marker["files"]
        if "/" not in f
        and f not in _TRAINER_STATE
        and not f.startswith("rng_state")
        and not f.endswith(".py")
    ]
    if not any(f.endswith((".safetensors", ".bin")) for f in model_files):
        raise ConfigError(
            f"{uri} holds no model weights: cannot finish the run from it; train with resume: false"
        )
    final_dir = work_dir / "final-from-checkpoint"
    shutil.rmtree(final_dir, ignore_errors=True)  # what an earlier try left
    download_folder(uri, model_files, final_dir)
    from training.deepspeed_config import deepspeed_config, skip_inference_kernels

    ds_config = deepspeed_config(config) if config.zero_stage > 0 else None
    if ds_config:
        skip_inference_kernels()
    meta = {k: v for k, v in marker.items() if k not in ("step", "loss", "samples_seen", "final", "files")}
    meta |= {"config_hash": config.config_hash(), "config": config.model_dump()}
    save_final(config, _Finished(result), loaded=None, final_dir=final_dir, ds_config=ds_config, meta=meta)
    return result


class _Finished:
    """A result read from a checkpoint marker, shaped as :func:`save_final` reads a TrainResult."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.steps = result["steps"]
        self.final_loss = result["final_loss"]
        self.mean_loss = result["mean_loss"]
        self.samples_seen = result["samples_seen"]
        self.examples_per_step = result["examples_per_step"]
        self.skipped: dict[str, int] = {}
        self.truncated = 0


def save_final(
    config: TrainConfig,
    result: Any,
    *,
    loaded: Any,
    final_dir: Path,
    ds_config: dict[str, Any] | None,
    meta: dict[str, Any],
) -> None:
    """``result``: the run's :class:`~training.sft.TrainResult`; ``loaded``: its base model (``LoadedModel``).

    Rank 0: tokenizer, processor and DeepSpeed config beside the saved model, everything uploaded
    to ``output_uri``, ``checkpoint.json`` last (a checkpoint folder without it is an interrupted
    upload). ``loaded`` None: the tokenizer and processor are in ``final_dir`` already."""
    if loaded is not None:
        loaded.tokenizer.save_pretrained(str(final_dir))
        if loaded.image_processor is not None:
            loaded.image_processor.save_pretrained(str(final_dir))
    (final_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    uploaded = upload_folder(final_dir, config.output_uri)
    if os.environ.get(ENV_KILL_BEFORE_FINAL_MARKER):  # tests only: a crash before the final marker
        log.warning("%s is set: killed before the final marker", ENV_KILL_BEFORE_FINAL_MARKER)
        os.kill(os.getpid(), signal.SIGKILL)
    write_checkpoint_marker(
        config.output_uri,
        {
            **meta,
            "step": result.steps,
            "loss": result.final_loss,
            "mean_loss": result.mean_loss,
            "samples_seen": result.samples_seen,
            "examples_per_step": result.examples_per_step,
            "skipped": result.skipped,
            "truncated": result.truncated,
            "files": uploaded,
            "final": True,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions(),
        },
    )


def versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
    }
