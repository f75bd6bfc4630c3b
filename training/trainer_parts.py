"""The pieces ``train`` hands to HF ``Trainer``: the trainer that counts the sequences it trains on,
the callbacks that upload intermediate checkpoints (marker last) and log the last step's loss, and
the streaming encoder that counts malformed rows as they pass."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from octomed_data.layout import CheckpointFolder
from training.checkpoints import list_files, upload_folder, write_checkpoint_marker
from training.data import RowEncoder
from training.distributed import all_nodes_ok, barrier

log = logging.getLogger(__name__)


def trainer_class():
    from transformers import Trainer

    class CountingTrainer(Trainer):
        """Counts the sequences that really go through the model (exact samples_seen)."""

        samples_seen_local = 0

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            # Packed batches say how many examples their rows hold; it is no model input.
            examples = inputs.pop("num_examples", None)
            if model.training:
                self.samples_seen_local += int(
                    examples if examples is not None else inputs["input_ids"].shape[0]
                )
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    return CountingTrainer


def upload_callback(output_uri: str, meta: dict[str, Any], loaded: Any = None, samples: Any = None):
    from transformers import TrainerCallback

    class UploadCheckpoints(TrainerCallback):
        """Uploads each intermediate checkpoint Trainer saves; the marker goes last.

        Every node's local rank 0 uploads what its node wrote (with several nodes, ZeRO shards are
        spread over their local disks), then global rank 0 lists the upload and writes the marker.
        The image processor goes with it (a VL checkpoint is then evaluable as is: learning curves),
        and the marker says how many sequences were trained on up to it (``samples_seen``: all
        processes, this call; ``samples()`` sums them, so every rank calls it).
        """

        def on_save(self, args, state, control, **kwargs):
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            dest = CheckpointFolder(output_uri).step(local.name)
            seen = samples() if samples is not None else None
            uploaded = True
            if state.is_local_process_zero:
                uploaded = local.is_dir()
                if uploaded:
                    if loaded is not None and loaded.image_processor is not None:
                        loaded.image_processor.save_pretrained(str(local))
                    upload_folder(local, dest)
            # The marker says "complete": only when every node uploaded what it saved.
            if not all_nodes_ok(uploaded):
                log.warning("checkpoint %s was not uploaded by every node: no marker written", local.name)
                return
            if state.is_world_process_zero:
                loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
                write_checkpoint_marker(
                    dest,
                    {
                        **meta,
                        "step": state.global_step,
                        "loss": loss,
                        "samples_seen": seen,
                        "final": False,
                        "files": list_files(dest),
                    },
                )
            barrier()

    return UploadCheckpoints()


def log_last_step_callback():
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        """Trainer logs every ``logging_steps`` (and the first step): log the last step too, so the
        run's final loss is the loss at its last step, not at the last multiple of logging_steps."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return LogLastStep()


def final_loss_of(log_history: list[dict[str, Any]], last_step: int) -> float | None:
    """The loss Trainer logged at ``last_step`` (the mean since the previous log, over every
    rank); None when that step logged none (never after :func:`log_last_step_callback`)."""
    return next(
        (float(h["loss"]) for h in reversed(log_history) if "loss" in h and h.get("step") == last_step), None
    )


class CountingEncoder(RowEncoder):
    """Streaming mode: rows are encoded lazily, so problems are counted as they pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors: Counter = Counter()
        self.truncated = 0

    def __call__(self, row):
        out = super().__call__(row)
        if out["encode_error"]:
            self.errors[out["encode_error"]] += 1
        self.truncated += int(out["truncated"])
        return out
