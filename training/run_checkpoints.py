"""The checkpoints of one SFT run: resuming from the newest uploaded intermediate checkpoint of
the same config and data, and saving the final one (``checkpoint.json`` last)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from octomed_data.job_config import TrainConfig
from training.checkpoints import download_folder, latest_resumable, upload_folder, write_checkpoint_marker

log = logging.getLogger(__name__)


def resume_checkpoint(config: TrainConfig, meta: dict[str, Any], work_dir: Path, args: Any) -> Path | None:
    """The newest uploaded intermediate checkpoint of this config and data, downloaded; None if none."""
    if not config.resume:
        return None
    found = latest_resumable(config.output_uri, meta["config_hash"], meta["data_manifest"])
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
    to ``output_uri``, ``checkpoint.json`` last (a checkpoint folder without it is an interrupted upload)."""
    loaded.tokenizer.save_pretrained(str(final_dir))
    if loaded.image_processor is not None:
        loaded.image_processor.save_pretrained(str(final_dir))
    (final_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    uploaded = upload_folder(final_dir, config.output_uri)
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
