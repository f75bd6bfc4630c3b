"""Full-parameter SFT with HF ``Trainer`` + DeepSpeed ZeRO on the factory's conversational export.

``train(config)`` is the one entry point (the Prefect training flow calls it, so does
``octomed-data train`` and ``python -m training.sft``). Its steps, each a function here:

1. :func:`load_training_files`: the export's Parquet files (manifest-committed shards only), checked;
2. :func:`load_model`: the base model resolved once per node (:mod:`training.models`) and loaded;
3. :func:`training_arguments`: ``TrainingArguments`` with a DeepSpeed JSON config generated from
   :class:`TrainConfig` (:mod:`training.deepspeed_config`; "auto" values filled by ``Trainer`` from
   the same numbers, so the two can't disagree);
4. :func:`tokenize`: loss on assistant tokens only (:mod:`training.data`), counting malformed rows;
5. :func:`batching`: sequence packing (:mod:`training.packing`) or the padding collator;
6. :func:`~training.run_checkpoints.resume_checkpoint`: the newest uploaded intermediate checkpoint of this config, if any;
   before any of it, :func:`training.once.prior_training`: a finished training of the same settings
   trains nothing (its result is returned), one asking only for more ``max_steps`` is extended, and
   a job whose last checkpoint is at ``max_steps`` (killed before its final marker) writes the final
   model from that checkpoint without training a step;
7. :func:`~training.run_checkpoints.save_final`: the final model (ZeRO-3 gathers full weights) uploaded to ``output_uri`` with
   ``checkpoint.json`` written last (:mod:`training.checkpoints`), so a checkpoint without it is
   known to be incomplete.

Multi-GPU: run this module under a launcher (:func:`training.launch.launch_command`); each process
reads RANK/WORLD_SIZE from the launcher. Without a launcher, single-process defaults are set.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from octomed_data import storage
from octomed_data.errors import ConfigError, OctomedError
from octomed_data.job_config import TrainConfig, load_yaml_config
from training.data import (
    DataFile,
    RowEncoder,
    SFTCollator,
    check_columns,
    count_rows_with_images,
    encoded_features,
    refuse_secrets,
    resolve_data_files,
)
from training.deepspeed_config import deepspeed_config, skip_inference_kernels
from training.distributed import all_reduce_sum, die_with_parent, distributed_env, node_lock
from training.models import is_vision_model, load_model_and_processors, resolve_model
from training.once import finished_result, prior_training
from training.packing import build_packed_data
from training.run_checkpoints import (
    finalize_from_checkpoint,
    latest_resumable,
    remove_final_marker,
    resume_checkpoint,
    save_final,
)
from training.trainer_parts import (
    CountingEncoder,
    final_loss_of,
    log_last_step_callback,
    trainer_class,
    upload_callback,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced."""

    checkpoint_uri: str
    steps: int
    final_loss: float | None  # the training loss logged at the last step
    mean_loss: float | None  # mean over the run (Trainer's training_loss)
    samples_seen: int  # sequences through forward/backward in this call (all processes; not before a resume)
    rows: int  # rows in the export files
    skipped: dict[str, int] = field(default_factory=dict)  # malformed rows by reason (streaming: seen so far)
    truncated: int = 0
    runtime_s: float = 0.0  # whole call: loading, tokenising, training, saving, uploading
    train_runtime_s: float = 0.0  # the training loop alone (Trainer's train_runtime)
    losses: list[float] = field(default_factory=list)  # every logged loss, in order
    resumed_from_step: int = 0  # > 0 when the run continued an uploaded intermediate checkpoint
    examples_per_step: float | None = None  # examples per optimizer step (packing: expected, from the mean)
    packing: dict[str, Any] | None = None  # packing statistics and plan; None when padding
    trained_already: bool = False  # True: a finished training of these settings was found, nothing trained

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """The base model of a run, loaded: where it came from and whether it sees images."""

    path: Path
    vision: bool
    model: Any
    tokenizer: Any
    image_processor: Any


def _encoded_ok(encode_error: str | None) -> bool:
    """Rows that encoded cleanly (a named function: ``datasets`` fingerprints it without noise)."""
    return encode_error is None


# --------------------------------------------------------------------------- the steps of train()


def load_training_files(config: TrainConfig) -> tuple[list[DataFile], int]:
    """The export's committed Parquet files, checked, and their row count (no rows: one error; a
    file holding the value of an API key variable named by ``secret_env_names``: one error)."""
    files = resolve_data_files(config.train_data)
    check_columns(files)
    refuse_secrets(files, config.secret_env_names)
    rows = sum(f.rows for f in files)
    if rows == 0:
        raise ConfigError(f"training data {config.train_data} has no rows")
    return files, rows


def job_work_dir(config: TrainConfig) -> Path:
    """The job's local work folder, created.

    Every process of a job must agree on it (ZeRO writes its shards there): derived from what is
    trained and where it goes, so two jobs never share one.
    """
    job_key = hashlib.sha256(f"{config.config_hash()} {config.output_uri}".encode()).hexdigest()[:16]
    default_work = Path(tempfile.gettempdir()) / f"octomed-sft-{job_key}"
    work_dir = Path(config.work_dir) if config.work_dir else default_work
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def load_model(config: TrainConfig, work_dir: Path, files: list[DataFile], rows: int) -> LoadedModel:
    """The base model, resolved once per node, loaded; a text model with image rows is one error.

    Called before ``TrainingArguments``: the full model is loaded on each process and partitioned
    when the DeepSpeed engine starts (after it, ZeRO-3 would partition at load with a world size
    not yet known).
    """
    with node_lock(work_dir / ".resolve-model.lock"):  # one download per node; the others reuse it
        model_path = resolve_model(config.model_path, work_dir / "base-model")
    vision = is_vision_model(model_path)
    if not vision:
        with_images = count_rows_with_images(files)
        if with_images:
            raise ConfigError(
                f"{with_images} of {rows} training rows have images but the model at {model_path} is "
                "text-only; train a vision-language model or export a text-only mixture"
            )
    model, tokenizer, image_processor = load_model_and_processors(
        model_path, attn_implementation=config.attn_implementation
    )
    if config.gradient_checkpointing:
        model.config.use_cache = False
    return LoadedModel(model_path, vision, model, tokenizer, image_processor)


def tensorboard_dir(config: TrainConfig, work_dir: Path) -> str:
    """Where TensorBoard event files go: ``logging_dir``, else ``<work_dir>/tensorboard``."""
    return config.logging_dir or str(work_dir / "tensorboard")


def training_arguments(
    config: TrainConfig,
    *,
    rows: int,
    work_dir: Path,
    precision: str,
    cuda: bool,
    ds_config: dict[str, Any] | None,
    progress: bool,
) -> Any:
    """The ``TrainingArguments`` of the run; stale local checkpoints of a killed job are cleared."""
    from transformers import TrainingArguments

    plan = config.batch_plan()
    max_steps = config.max_steps or -1
    if config.streaming and max_steps < 0:
        # An iterable dataset has no length: derive the step count from the footer row counts.
        max_steps = max(1, math.ceil(rows * config.num_train_epochs / plan.global_batch_size))

    if config.report_to == "tensorboard":
        # transformers 5 takes the event-file folder from the environment only.
        os.environ["TENSORBOARD_LOGGING_DIR"] = tensorboard_dir(config, work_dir)
    args = TrainingArguments(
        output_dir=str(work_dir / "trainer"),
        per_device_train_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        num_train_epochs=config.num_train_epochs,
        max_steps=max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio of total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        report_to=config.report_to,
        deepspeed=ds_config,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=config.dataloader_num_workers,
        remove_unused_columns=False,
        # Streaming: every process reads the stream and keeps its share of samples. Dispatching
        # collated batches from rank 0 would slice pixel_values (patches, not samples) by batch size.
        accelerator_config={"dispatch_batches": False} if config.streaming else None,
        disable_tqdm=not progress,
    )
    # Checkpoints a killed earlier job left on local disk are never reused (a resume comes from the
    # store): stale higher-numbered ones would make Trainer's rotation delete fresh saves.
    with args.main_process_first(local=True, desc="clear stale local checkpoints"):
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            shutil.rmtree(work_dir / "trainer", ignore_errors=True)
    return args


def tokenize(
    config: TrainConfig, files: list[DataFile], args: Any, encoder: RowEncoder, rows: int
) -> tuple[Any, dict[str, int], int]:
    """(the encoded training dataset, malformed rows by reason, truncated rows).

    Streaming: the dataset is lazy, so the counts come later from the encoder (:class:`CountingEncoder`).
    """
    import datasets

    data_files = [f.uri for f in files]
    skipped: dict[str, int] = {}
    truncated = 0
    with args.main_process_first(desc="tokenize"):
        # load_dataset mutates storage_options: always hand it a fresh copy.
        raw = datasets.load_dataset(
            "parquet",
            data_files=data_files,
            split="train",
            streaming=config.streaming,
            storage_options=storage.storage_options(data_files[0]),
        )
        columns = list(raw.column_names or [])
        if isinstance(raw.features, datasets.Features) and "images" in raw.features:
            # Keep images as {bytes, path}: decoding every image while tokenising would be wasted
            # work, and the collator decodes (and resizes) only what a batch needs.
            raw = raw.cast_column("images", datasets.List(datasets.Image(decode=False)))
        if config.streaming:
            train_ds = (
                raw.map(encoder, remove_columns=columns, features=encoded_features())
                .filter(_encoded_ok, input_columns=["encode_error"])
                .remove_columns(["encode_error", "truncated"])
                .shuffle(seed=config.seed, buffer_size=config.shuffle_buffer)
            )
        else:
            encoded = raw.map(encoder, remove_columns=columns, features=encoded_features(), desc="tokenize")
            errors = encoded.data.column("encode_error").value_counts().to_pylist()
            skipped = {e["values"]: int(e["counts"]) for e in errors if e["values"] is not None}
            truncated = int(pc.sum(encoded.data.column("truncated")).as_py() or 0)
            train_ds = encoded.filter(_encoded_ok, input_columns=["encode_error"]).remove_columns(
                ["encode_error", "truncated"]
            )
            if len(train_ds) == 0:
                raise ConfigError(f"no usable training rows: all {rows} rows were malformed ({skipped})")
    return train_ds, skipped, truncated


def batching(
    config: TrainConfig, train_ds: Any, args: Any, loaded: LoadedModel, rows: int
) -> tuple[Any, Any, Any, Any]:
    """(dataset, collator, packed data or None, training arguments): packing (:mod:`training.packing`)
    replaces rows by packs and the global batch counts examples; otherwise the padding collator."""
    plan = config.batch_plan()
    model, tokenizer, image_processor = loaded.model, loaded.tokenizer, loaded.image_processor
    packed = None
    if config.packing:
        packed = build_packed_data(
            config,
            train_ds,
            model_config=model.config,
            pad_token_id=tokenizer.pad_token_id,
            image_processor=image_processor,
            world_size=plan.world_size,
        )
        train_ds, collator = packed.dataset, packed.collator
        updates: dict[str, Any] = {"gradient_accumulation_steps": packed.plan.gradient_accumulation_steps}
        if config.streaming and not config.max_steps:
            updates["max_steps"] = max(
                1, math.ceil(rows * config.num_train_epochs / packed.plan.examples_per_step)
            )
        # replace() re-runs __post_init__, which re-derives DeepSpeed's "auto" batch sizes.
        args = dataclasses.replace(args, **updates)
    else:
        collator = SFTCollator(
            pad_token_id=tokenizer.pad_token_id,
            max_seq_len=config.max_seq_len,
            image_processor=image_processor,
            image_token_id=getattr(model.config, "image_token_id", None),
            max_pixels=config.max_pixels,
        )
    return train_ds, collator, packed, args


# --------------------------------------------------------------------------- train


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Run SFT as configured; returns where the checkpoint went and what the run did."""
    with distributed_env():
        return train_job(config, progress=progress)


def train_job(config: TrainConfig, *, progress: bool) -> TrainResult:
    """:func:`train` inside the distributed variables it needs."""
    # torch.distributed warns on every ZeRO collective about renamed APIs DeepSpeed still calls.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    started = time.time()
    files, rows = load_training_files(config)
    plan = config.batch_plan()
    storage.ensure_writable(config.output_uri)
    manifest = [{"uri": f.uri, "rows": f.rows} for f in files]
    prior = prior_training(config, manifest)
    if prior.state == "done":
        log.info(
            "%s is trained already with these settings (step %d): nothing trained",
            config.output_uri,
            prior.step,
        )
        return TrainResult(**finished_result(prior, rows) | {"checkpoint_uri": config.output_uri})
    if prior.state == "extend":
        log.info(
            "extending the training at %s from step %d to max_steps %s",
            config.output_uri,
            prior.step,
            config.max_steps,
        )
    elif prior.state == "other":
        log.warning(
            "%s holds a finished training with other settings (%s): training these settings from step 0 "
            "replaces it",
            config.output_uri,
            prior.describe(),
        )
    last = latest_resumable(config, manifest) if config.resume else None
    if prior.state == "extend" and last is None:
        log.warning("no intermediate checkpoint of %s to continue: training from step 0", config.output_uri)
    if last is not None and config.max_steps is not None and int(last[1]["step"]) >= config.max_steps:
        # Killed after its last checkpoint, before its final marker: the model is that checkpoint's.
        return TrainResult(
            **finalize_from_checkpoint(config, last, job_work_dir(config), rows=rows)
            | {"runtime_s": round(time.time() - started, 3)}
        )

    import torch

    cuda = torch.cuda.is_available()
    precision = config.resolved_precision(cuda)
    rank = int(os.environ.get("RANK", "0"))
    work_dir = job_work_dir(config)
    ds_config = deepspeed_config(config) if config.zero_stage > 0 else None
    if ds_config:
        skip_inference_kernels()
    loaded = load_model(config, work_dir, files, rows)
    args = training_arguments(
        config,
        rows=rows,
        work_dir=work_dir,
        precision=precision,
        cuda=cuda,
        ds_config=ds_config,
        progress=progress,
    )
    encoder_cls = CountingEncoder if config.streaming else RowEncoder
    encoder = encoder_cls(loaded.tokenizer, config.max_seq_len, multimodal=loaded.vision)
    train_ds, skipped, truncated = tokenize(config, files, args, encoder, rows)
    train_ds, collator, packed, args = batching(config, train_ds, args, loaded, rows)
    if packed is not None:
        skipped = dict(Counter(skipped) + packed.errors)
    if skipped:
        log.warning("skipped malformed training rows: %s", skipped)
    meta = {
        "config_hash": config.config_hash(),
        "config": config.model_dump(),
        "data_manifest": [{"uri": f.uri, "rows": f.rows} for f in files],
        "world_size": plan.world_size,
        "precision": precision,
        "zero_stage": config.zero_stage,
        "base_model": str(loaded.path),
        "packing": packed.info if packed else None,
    }
    holder: list[Any] = []  # the trainer, for the upload callback's samples_seen
    uploads = upload_callback(
        config.output_uri, meta, loaded, samples=lambda: all_reduce_sum(holder[0].samples_seen_local)
    )
    trainer = trainer_class()(
        model=loaded.model,
        args=args,
        train_dataset=train_ds,
        data_collator=collator,
        processing_class=loaded.tokenizer,
        callbacks=[log_last_step_callback()] + ([uploads] if config.save_steps else []),
    )
    holder.append(trainer)
    resume_from = resume_checkpoint(last, work_dir, args)
    if rank == 0 and prior.state in ("extend", "other"):
        remove_final_marker(config.output_uri)  # the folder is not a finished training until this one ends
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    samples_seen = all_reduce_sum(trainer.samples_seen_local)
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    resumed_step = (
        int(json.loads((resume_from / "trainer_state.json").read_text())["global_step"]) if resume_from else 0
    )
    final_loss = final_loss_of(trainer.state.log_history, int(output.global_step))
    if final_loss is None and losses:
        log.warning(
            "no loss logged at the last step %d: final_loss is the last logged one", output.global_step
        )
        final_loss = losses[-1]
    if config.streaming:
        skipped, truncated = (
            dict(encoder.errors + (packed.errors if packed else Counter())),
            encoder.truncated,
        )

    final_dir = work_dir / "final"
    trainer.save_model(str(final_dir))  # every rank takes part (ZeRO-3 gathers the weights)
    result = TrainResult(
        checkpoint_uri=config.output_uri,
        steps=int(output.global_step),
        final_loss=final_loss,
        mean_loss=float(output.training_loss) if output.training_loss is not None else None,
        samples_seen=samples_seen,
        rows=rows,
        skipped=skipped,
        truncated=truncated,
        runtime_s=round(time.time() - started, 3),
        train_runtime_s=round(float(output.metrics.get("train_runtime", 0.0)), 3),
        losses=losses,
        resumed_from_step=resumed_step,
        examples_per_step=packed.plan.examples_per_step if packed else float(plan.global_batch_size),
        packing=packed.info if packed else None,
    )
    if rank == 0:
        save_final(config, result, loaded=loaded, final_dir=final_dir, ds_config=ds_config, meta=meta)
        if not config.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m training.sft --config cfg.yaml``: what each launched process runs."""
    parser = argparse.ArgumentParser(prog="python -m training.sft", description="OctoMed SFT (DeepSpeed)")
    parser.add_argument("--config", required=True, help="TrainConfig YAML (local path or URI)")
    parser.add_argument("--max-steps", type=int, default=None, help="override max_steps (smoke runs)")
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment is what is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--result-file", default=None, help="rank 0 writes the TrainResult JSON here")
    args = parser.parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # started by a launcher: never outlive it
        die_with_parent(signal.SIGKILL)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_yaml_config(args.config, TrainConfig, {"max_steps": args.max_steps})
        result = train(config, progress=not args.no_progress)
    except OctomedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(result.to_dict())
        if args.result_file:
            Path(args.result_file).write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
