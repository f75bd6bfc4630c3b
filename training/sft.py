"""Full-parameter SFT with HF ``Trainer`` + DeepSpeed ZeRO on the factory's conversational export.

``train(config)`` is the one entry point (the Prefect training flow calls it, so does
``octomed-data train`` and ``python -m training.sft``). It

1. resolves the export's Parquet files (manifest-committed shards only) and checks them,
2. tokenises with loss on assistant tokens only (:mod:`training.data`), counting malformed rows,
3. trains with a DeepSpeed JSON config generated from :class:`TrainConfig` ("auto" values filled
   by ``Trainer`` from the same numbers, so the two can't disagree),
4. saves the final model (ZeRO-3 gathers full weights), uploads it to ``output_uri`` and writes
   ``checkpoint.json`` last, so a checkpoint without it is known to be incomplete.

Multi-GPU: run the same module under a launcher (see :func:`launch_command`); each process
reads RANK/WORLD_SIZE from the launcher. Without a launcher, single-process defaults are set.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
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
from training.config import TrainConfig, load_yaml_config
from training.data import (
    RowEncoder,
    SFTCollator,
    check_columns,
    count_rows_with_images,
    encoded_features,
    resolve_data_files,
)
from training.packing import build_packed_data

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint.json"
VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class TrainResult:
    """What a training run produced."""

    checkpoint_uri: str
    steps: int
    final_loss: float | None  # last logged training loss
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- environment


def _encoded_ok(encode_error: str | None) -> bool:
    """Rows that encoded cleanly (a named function: ``datasets`` fingerprints it without noise)."""
    return encode_error is None


def ensure_distributed_env() -> None:
    """Single process without a launcher: set the variables DeepSpeed/torch.distributed read.

    Without them DeepSpeed tries MPI discovery (mpi4py) and fails.
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def is_vision_model(model_path: str | Path) -> bool:
    """Whether the checkpoint at ``model_path`` is a Qwen2(.5)-VL (reads config.json only)."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return cfg.get("model_type") in VL_MODEL_TYPES


def check_model_path(model_path: str) -> Path:
    """A local model folder with ``config.json``; anything else is one clear error."""
    path = Path(model_path)
    if "://" in model_path or not (path / "config.json").is_file():
        raise ConfigError(
            f"model_path {model_path!r} is not a local model folder with config.json "
            "(give a folder, a finished checkpoint URI, or a Hugging Face model id)"
        )
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str, cache_dir: Path) -> Path:
    """A local folder holding ``model``: a folder is used in place, a finished checkpoint URI
    (``s3://``/``file://``, with ``checkpoint.json``) is downloaded into ``cache_dir``, and a Hugging Face
    model id (``Qwen/Qwen2.5-VL-7B-Instruct``) comes from the local HF cache, or from the hub where it is
    reachable (``HF_HUB_OFFLINE=1`` forbids that). Whatever fails is one :class:`ConfigError` line.
    """
    if "://" in model and not model.startswith("file://"):
        marker_uri = storage.join(model, CHECKPOINT_MARKER)
        if not storage.exists(marker_uri):
            raise ConfigError(f"no {CHECKPOINT_MARKER} at {model}: not a finished checkpoint")
        marker = storage.read_json(marker_uri)
        local = cache_dir / "checkpoint"
        done = local / ".complete"
        if not done.is_file() or done.read_text() != marker.get("created_at", ""):
            download_folder(model, marker.get("files") or [], local)
            done.write_text(marker.get("created_at", ""))
        return check_model_path(str(local))
    path = Path(model.removeprefix("file://"))
    if path.exists() or not _HUB_ID.match(model):
        return check_model_path(str(path))
    try:
        from huggingface_hub import snapshot_download

        return check_model_path(snapshot_download(model, allow_patterns=_MODEL_FILES))
    except ConfigError:
        raise
    except Exception as exc:  # offline, unknown repo, gated model, no network
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot resolve model {model!r} from the Hugging Face cache or hub ({type(exc).__name__}: "
            f"{first[:200]}); download it where the hub is reachable and give the local folder"
        ) from None


# What a from_pretrained load needs: weights, configs, tokenizer and processor files.
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def load_model_and_processors(
    model_path: str | Path, torch_dtype: Any = None, attn_implementation: str = "auto"
):
    """(model, tokenizer, image_processor or None) from a local folder, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"tokenizer at {model_path} has no pad token")
    kwargs = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation != "auto":
        if attn_implementation.startswith("flash"):
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None:
                raise ConfigError(
                    "attn_implementation flash_attention_2 needs flash-attn on a GPU "
                    "(pip install flash-attn --no-build-isolation); use auto or sdpa here"
                )
        kwargs["attn_implementation"] = attn_implementation
    if is_vision_model(model_path):
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(model_path), **kwargs)
        image_processor = load_image_processor(model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
        image_processor = None
    return model, tokenizer, image_processor


def load_image_processor(model_path: str | Path):
    """The PIL Qwen2-VL image processor (the torchvision one can't be installed on CPU machines)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if not (Path(model_path) / "preprocessor_config.json").is_file():
        raise ConfigError(f"vision model at {model_path} has no preprocessor_config.json")
    return Qwen2VLImageProcessorPil.from_pretrained(str(model_path), local_files_only=True)


# --------------------------------------------------------------------------- deepspeed


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """DeepSpeed JSON config for ``config``. "auto" values are filled by ``Trainer`` from its args."""
    zero: dict[str, Any] = {
        "stage": config.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_bucket_size": "auto",
    }
    if config.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
                "sub_group_size": 1e9,
                # Save a full (unsharded) model.safetensors, loadable without DeepSpeed.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if config.zero_stage == 2:
        zero["allgather_bucket_size"] = 5e8
    ds: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "steps_per_print": 10**9,  # Trainer logs; DeepSpeed's own prints only add noise
        "wall_clock_breakdown": False,
    }
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # CPU offload needs DeepSpeed's own (CPU-Adam) optimizer.
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return ds


def launch_command(
    config_path: str,
    *,
    num_gpus: int,
    num_nodes: int = 1,
    launcher: str = "deepspeed",
    master_addr: str | None = None,
    master_port: int = 29500,
    hostfile: str | None = None,
) -> list[str]:
    """The command line that runs ``training.sft`` on ``num_gpus`` GPUs per node (not run here).

    ``deepspeed`` reads a hostfile for multi-node runs; ``torchrun`` is run once per node with a
    c10d rendezvous at ``master_addr:master_port``.
    """
    if num_gpus < 1 or num_nodes < 1:
        raise ConfigError("num_gpus and num_nodes must be >= 1")
    if launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", str(num_gpus)]
        if num_nodes > 1:
            if not hostfile or not master_addr:
                raise ConfigError("a multi-node deepspeed launch needs hostfile and master_addr")
            cmd += ["--num_nodes", str(num_nodes), "--hostfile", hostfile]
            cmd += ["--master_addr", master_addr, "--master_port", str(master_port)]
        return cmd + ["--module", "training.sft", "--config", config_path]
    if launcher == "torchrun":
        cmd = ["torchrun", "--nproc_per_node", str(num_gpus), "--nnodes", str(num_nodes)]
        if num_nodes == 1:
            cmd.insert(1, "--standalone")  # private rendezvous on a free port
        else:
            if not master_addr:
                raise ConfigError("a multi-node torchrun launch needs master_addr")
            cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master_addr}:{master_port}"]
        return cmd + ["-m", "training.sft", "--config", config_path]
    raise ConfigError(f"unknown launcher {launcher!r} (deepspeed or torchrun)")


# --------------------------------------------------------------------------- training


def _trainer_class():
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


def _upload_callback(output_uri: str, meta: dict[str, Any]):
    from transformers import TrainerCallback

    class UploadCheckpoints(TrainerCallback):
        """Uploads each intermediate checkpoint Trainer saves; the marker goes last.

        Every node's local rank 0 uploads what its node wrote (with several nodes, ZeRO shards are
        spread over their local disks), then global rank 0 lists the upload and writes the marker.
        """

        def on_save(self, args, state, control, **kwargs):
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            dest = storage.join(output_uri, "checkpoints", local.name)
            uploaded = True
            if state.is_local_process_zero:
                uploaded = local.is_dir()
                if uploaded:
                    upload_folder(local, dest)
            # The marker says "complete": only when every node uploaded what it saved.
            if not _all_nodes_ok(uploaded):
                log.warning("checkpoint %s was not uploaded by every node: no marker written", local.name)
                return
            if state.is_world_process_zero:
                loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
                storage.write_json(
                    storage.join(dest, CHECKPOINT_MARKER),
                    {
                        **meta,
                        "step": state.global_step,
                        "loss": loss,
                        "final": False,
                        "files": list_files(dest),
                    },
                )
            _barrier()

    return UploadCheckpoints()


@contextlib.contextmanager
def _node_lock(path: Path):
    """An exclusive lock among the processes of one node (an flock on a file in the work folder)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _all_nodes_ok(ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (a MIN all-reduce; also a barrier)."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(ok)], dtype=torch.long, device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return ok


def _collective_device():
    """Where a tensor for a collective must live: the current GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def list_files(uri: str) -> list[str]:
    """Every file under ``uri``, as sorted paths relative to it."""
    fs, base = storage.filesystem(uri)
    base = base.rstrip("/")
    try:
        found = fs.find(base)
    except Exception as exc:
        raise ConfigError(storage.describe_error(uri, exc)) from None
    return sorted(
        p[len(base) + 1 :] for p in found if p.startswith(base + "/") and CHECKPOINT_MARKER not in p
    )


def latest_resumable(
    output_uri: str, config_hash: str, data_manifest: list[dict[str, Any]] | None = None
) -> tuple[str, dict[str, Any]] | None:
    """The newest uploaded intermediate checkpoint of this exact config (URI, marker), if any.

    Checkpoints of another config (schedule, model, data URIs) or of other data files (row
    counts differ) are never resumed from.
    """
    base = storage.join(output_uri, "checkpoints")
    fs, path = storage.filesystem(base)
    try:
        if not fs.exists(path):
            return None
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except Exception as exc:
        raise ConfigError(storage.describe_error(base, exc)) from None
    found = []
    for name in names:
        marker_uri = storage.join(base, name, CHECKPOINT_MARKER)
        if name.startswith("checkpoint-") and storage.exists(marker_uri):
            marker = storage.read_json(marker_uri)
            same_data = data_manifest is None or marker.get("data_manifest") == data_manifest
            if marker.get("config_hash") == config_hash and same_data:
                found.append((int(marker["step"]), storage.join(base, name), marker))
            else:
                log.warning("not resuming from %s: it was trained with another config", name)
    if not found:
        return None
    _, uri, marker = max(found, key=lambda f: f[0])
    return uri, marker


def download_folder(src_uri: str, files: list[str], local: Path) -> Path:
    """Copy ``files`` (relative paths) from ``src_uri`` into ``local`` (streamed)."""
    fs, base = storage.filesystem(src_uri)
    for rel in files:
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get_file(
                f"{base.rstrip('/')}/{rel}" if "://" in src_uri else os.path.join(base, rel), str(target)
            )
        except Exception as exc:
            raise ConfigError(storage.describe_error(src_uri, exc)) from None
    return local


def upload_folder(local: Path, dest_uri: str) -> list[str]:
    """Copy every file under ``local`` to ``dest_uri`` (streamed: model shards can be many GB)."""
    fs, base = storage.filesystem(dest_uri)
    uploaded = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        target = f"{base.rstrip('/')}/{rel}" if "://" in dest_uri else os.path.join(base, rel)
        try:
            if "://" not in dest_uri:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.put_file(str(path), target)
        except Exception as exc:
            raise ConfigError(storage.describe_error(dest_uri, exc)) from None
        uploaded.append(rel)
    return uploaded


class _CountingEncoder(RowEncoder):
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


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Run SFT as configured; returns where the checkpoint went and what the run did."""
    ensure_distributed_env()
    # torch.distributed warns on every ZeRO collective about renamed APIs DeepSpeed still calls.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    started = time.time()
    files = resolve_data_files(config.train_data)
    check_columns(files)
    rows = sum(f.rows for f in files)
    if rows == 0:
        raise ConfigError(f"training data {config.train_data} has no rows")
    plan = config.batch_plan()
    storage.ensure_writable(config.output_uri)

    import datasets
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    precision = config.resolved_precision(cuda)
    rank = int(os.environ.get("RANK", "0"))
    # Every process of a job must agree on the work folder (ZeRO writes its shards there): derived
    # from what is trained and where it goes, so two jobs never share one.
    job_key = hashlib.sha256(f"{config.config_hash()} {config.output_uri}".encode()).hexdigest()[:16]
    default_work = Path(tempfile.gettempdir()) / f"octomed-sft-{job_key}"
    work_dir = Path(config.work_dir) if config.work_dir else default_work
    work_dir.mkdir(parents=True, exist_ok=True)
    ds_config = deepspeed_config(config) if config.zero_stage > 0 else None
    # Before TrainingArguments: the full model is loaded on each process and partitioned when the
    # DeepSpeed engine starts (after it, ZeRO-3 would partition at load with a world size not yet known).
    with _node_lock(work_dir / ".resolve-model.lock"):  # one download per node; the others reuse it
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

    max_steps = config.max_steps or -1
    if config.streaming and max_steps < 0:
        # An iterable dataset has no length: derive the step count from the footer row counts.
        max_steps = max(1, math.ceil(rows * config.num_train_epochs / plan.global_batch_size))

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
        report_to="none",
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

    data_files = [f.uri for f in files]
    encoder_cls = _CountingEncoder if config.streaming else RowEncoder
    encoder = encoder_cls(tokenizer, config.max_seq_len, multimodal=vision)
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

    # ---- packing (training.packing): packs replace rows; the global batch counts examples ----
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
        skipped = dict(Counter(skipped) + packed.errors)
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
    # ---- end packing ----
    if skipped:
        log.warning("skipped malformed training rows: %s", skipped)
    meta = {
        "config_hash": config.config_hash(),
        "config": config.model_dump(),
        "data_manifest": [{"uri": f.uri, "rows": f.rows} for f in files],
        "world_size": plan.world_size,
        "precision": precision,
        "zero_stage": config.zero_stage,
        "base_model": str(model_path),
        "packing": packed.info if packed else None,
    }
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[_upload_callback(config.output_uri, meta)] if config.save_steps else None,
    )
    resume_from = None
    if config.resume:
        found = latest_resumable(config.output_uri, meta["config_hash"], meta["data_manifest"])
        if found:
            uri, marker = found
            resume_from = work_dir / "resume" / f"checkpoint-{marker['step']}"
            # Every node needs the checkpoint on local disk (DeepSpeed reads its own shards).
            with args.main_process_first(local=True, desc="download checkpoint"):
                if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                    download_folder(uri, marker["files"], resume_from)
            log.info("resuming from %s (step %s)", uri, marker["step"])
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    samples_seen = _all_reduce_sum(trainer.samples_seen_local)
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    resumed_step = (
        int(json.loads((resume_from / "trainer_state.json").read_text())["global_step"]) if resume_from else 0
    )
    final_loss = losses[-1] if losses else None
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
        tokenizer.save_pretrained(str(final_dir))
        if image_processor is not None:
            image_processor.save_pretrained(str(final_dir))
        (final_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        uploaded = upload_folder(final_dir, config.output_uri)
        # The marker goes last: a checkpoint folder without it is an interrupted upload.
        storage.write_json(
            storage.join(config.output_uri, CHECKPOINT_MARKER),
            {
                **meta,
                "step": result.steps,
                "loss": final_loss,
                "mean_loss": result.mean_loss,
                "samples_seen": samples_seen,
                "examples_per_step": result.examples_per_step,
                "skipped": skipped,
                "truncated": truncated,
                "files": uploaded,
                "final": True,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": _versions(),
            },
        )
        if not config.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return result


def _all_reduce_sum(value: int) -> int:
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.long, device=_collective_device())
        dist.all_reduce(t)
        return int(t.item())
    return value


def _versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
    }


def read_checkpoint_marker(checkpoint_uri: str) -> dict[str, Any]:
    """The ``checkpoint.json`` of a finished checkpoint; a missing one means an incomplete upload."""
    marker = storage.join(checkpoint_uri, CHECKPOINT_MARKER)
    if not storage.exists(marker):
        raise ConfigError(f"no {CHECKPOINT_MARKER} at {checkpoint_uri}: not a finished checkpoint")
    return storage.read_json(marker)


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
