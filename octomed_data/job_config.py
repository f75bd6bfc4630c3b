"""Typed configuration for SFT and evaluation, loadable from YAML.

Defaults follow the OctoMed recipe (arXiv 2511.23269): full SFT of Qwen2.5-VL-7B-Instruct for
3 epochs at a global batch of 512 sequences, learning rate 5e-5 on a cosine schedule with warmup
ratio 0.1, DeepSpeed ZeRO-3, bf16 on GPU, images capped at 262144 pixels. The sequence length is
not fixed by the paper; 16384 tokens fits long reasoning traces.

The global batch is a contract, not a hint: ``per_device_batch_size * grad_accum * world_size``
must equal ``global_batch_size`` exactly, and :meth:`TrainConfig.batch_plan` says clearly when the
numbers can't be met instead of silently training at another batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from octomed_data.config import load_yaml_config, validate_config
from octomed_data.errors import ConfigError

__all__ = [
    "BatchPlan",
    "EvalConfig",
    "EvalOptions",
    "TrainConfig",
    "TrainOptions",
    "load_yaml_config",
    "validate_config",
]

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is reached on ``world_size`` processes."""

    global_batch_size: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    world_size: int


class TrainOptions(BaseModel):
    """What an SFT job does, without where its data and checkpoint are: a recipe's
    ``training.config`` (the run fills in the locations: :meth:`job`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A local model folder, a finished checkpoint URI (s3://, file:// with checkpoint.json) or a
    # Hugging Face model id (resolved through the local HF cache; downloaded only where the hub is reachable).
    model_path: str | None = None
    work_dir: str | None = None  # local staging folder for checkpoints; default: a temp folder

    num_train_epochs: float = 3.0
    global_batch_size: int = 512
    per_device_batch_size: int = 1
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = Field(default=16384, ge=16)
    max_pixels: int = 262144  # images are resized to at most this many pixels before patching
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # auto: transformers' default (sdpa). flash_attention_2 needs flash-attn installed (GPU); packed
    # rows then take its varlen path.
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False  # ZeRO CPU-Adam offload (compiles an op; ~2 GB RAM per compile)
    gradient_checkpointing: bool = True
    max_steps: int | None = None  # override for smoke runs; None = derived from epochs
    world_size: int | None = None  # None: the WORLD_SIZE the launcher set (1 without a launcher)
    streaming: bool = False  # True: iterate Parquet without the local Arrow cache
    shuffle_buffer: int = 10_000  # streaming only
    seed: int = 42
    logging_steps: int = 10
    # Training metrics for a tracker the field already uses, local files by default: tensorboard
    # writes event files to ``logging_dir`` (default: <work_dir>/tensorboard); none: no tracker.
    report_to: Literal["none", "tensorboard"] = "none"
    logging_dir: str | None = None
    # Intermediate checkpoints every N steps, uploaded to output_uri/checkpoints; None: only the final one.
    save_steps: int | None = Field(default=250, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1)  # local copies kept (the store keeps every upload)
    resume: bool = True  # continue from the latest uploaded intermediate checkpoint of the same config
    dataloader_num_workers: int = 0
    # Sequence packing (training.packing): several examples per max_seq_len row, isolated from
    # each other; global_batch_size then counts examples, not rows.
    packing: bool = True
    packing_window: int = Field(default=4096, ge=1)  # examples bin-packed together (and streaming buffer)
    # Environment variables holding API keys (the recipe's teachers' ``api_key_env``): training
    # refuses data that holds one of their values.
    secret_env_names: list[str] = Field(default_factory=lambda: ["OPENAI_API_KEY", "TEACHER_API_KEY"])

    @field_validator("global_batch_size", "per_device_batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    def job(self, train_data: list[str], output_uri: str, **more: Any) -> TrainConfig:
        """The job on this run's data, into its checkpoint folder (``more``: e.g. ``model_path``)."""
        data = self.model_dump(exclude_unset=True) | {"train_data": train_data, "output_uri": output_uri}
        return validate_config(TrainConfig, data | more, where="training config")


class TrainConfig(TrainOptions):
    """One SFT run: data, model, schedule, parallelism and where the checkpoint goes."""

    # Data: the TRL conversational export (Parquet with `messages` [{role, content}] and `images` [uri]).
    # Each entry is a dataset folder (with a manifest), a folder of *.parquet, or one Parquet file.
    train_data: list[str] = Field(min_length=1)
    model_path: str
    output_uri: str  # where the final checkpoint (and checkpoint.json) is uploaded: local or s3://

    @field_validator("train_data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def resolved_world_size(self) -> int:
        """World size from the config, else from the launcher's WORLD_SIZE, else 1."""
        if self.world_size is not None:
            return self.world_size
        try:
            return int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None

    def batch_plan(self, world_size: int | None = None) -> BatchPlan:
        """Gradient accumulation that makes ``per_device * accum * world_size == global`` exactly."""
        ws = world_size if world_size is not None else self.resolved_world_size()
        if ws < 1:
            raise ConfigError(f"world size must be >= 1, got {ws}")
        per_step = self.per_device_batch_size * ws
        if self.packing:
            # With packing a micro-batch holds packs of several examples: the packed plan
            # (training.packing.packed_batch_plan) sets accumulation from the measured examples per
            # pack, so only a first estimate is needed here.
            return BatchPlan(
                global_batch_size=self.global_batch_size,
                per_device_batch_size=self.per_device_batch_size,
                gradient_accumulation_steps=max(1, round(self.global_batch_size / per_step)),
                world_size=ws,
            )
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"per_device_batch_size {self.per_device_batch_size} x world_size {ws} = {per_step}; "
                f"choose per_device_batch_size/GPU count so that it divides {self.global_batch_size}"
            )
        return BatchPlan(
            global_batch_size=self.global_batch_size,
            per_device_batch_size=self.per_device_batch_size,
            gradient_accumulation_steps=self.global_batch_size // per_step,
            world_size=ws,
        )

    def resolved_precision(self, cuda_available: bool) -> Literal["bf16", "fp16", "fp32"]:
        """``auto`` -> bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy here)."""
        if self.precision == "auto":
            return "bf16" if cuda_available else "fp32"
        if self.precision in ("bf16", "fp16") and not cuda_available:
            raise ConfigError(f"precision {self.precision!r} needs a GPU; use 'fp32' or 'auto' on CPU")
        return self.precision

    def settings(self) -> dict[str, Any]:
        """What changes what is trained (not where it is written, how it is logged or checked),
        as JSON values: what :meth:`config_hash` hashes and a finished training is compared with."""
        return json.loads(json.dumps(self.model_dump(mode="json", exclude=NOT_SETTINGS)))

    def config_hash(self) -> str:
        """Stable hash of everything that changes what is trained (not where it is written)."""
        payload = self.model_dump(exclude=NOT_SETTINGS)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# TrainConfig fields that do not change what is trained: outside config_hash and the settings a
# finished training is compared with.
NOT_SETTINGS = frozenset(
    {
        "output_uri",
        "work_dir",
        "logging_steps",
        "dataloader_num_workers",
        "save_steps",
        "save_total_limit",
        "resume",
        "report_to",
        "logging_dir",
        "secret_env_names",
    }
)


# Old evaluation names of the endpoint settings -> the teachers' names (TeacherConfig).
DEPRECATED_ENDPOINT_NAMES = {"concurrency": "max_in_flight", "request_timeout_s": "timeout_s"}


class EvalOptions(BaseModel):
    """The evaluation protocol and backend, without the model and the questions: a recipe's
    ``evaluation.config`` (the run fills in the rest: :meth:`job`). The endpoint settings have the
    teachers' names (``max_in_flight``, ``timeout_s``); the old ones are accepted with a warning."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    backend: Literal["auto", "hf", "openai", "vllm"] = "auto"  # auto: http(s) URL -> openai, else hf
    data_dir: str | None = None  # benchmark files; default $OCTOMED_EVAL_DATA, else ../shared/data
    output_uri: str | None = None  # default: <model>/eval/<name> (required for endpoints)
    name: str = "eval"
    prompting: Literal["cot", "direct"] = "cot"
    seeds: int = Field(default=5, ge=1)  # protocol seeds seed, seed+1, ...
    seed: int = 0
    temperature: float = Field(default=0.6, ge=0.0, le=2.0)  # 0: greedy (one seed is then enough)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=8192, ge=1)
    force_end_of_thinking: bool = True
    force_answer_tokens: int = Field(default=64, ge=1)  # the extra budget of a forced answer
    prefill_think: bool = False  # open the reply with "<think>" (R1-style evaluation of non-template models)

    limit: int | None = Field(default=None, ge=1)  # first N items per benchmark (per dataset)
    sources: list[str] | None = None  # questions_uri only: only these sources
    task_types: list[str] | None = None  # questions_uri only: only these task types
    batch_size: int = Field(default=8, ge=1)  # hf: sequences per generate call
    max_in_flight: int = Field(default=32, ge=1)  # openai: requests in flight (was: concurrency)

    served_model_name: str | None = None  # openai: default the first model the server lists
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the environment variable holding the key
    timeout_s: float = Field(default=600.0, gt=0.0)  # per request (was: request_timeout_s)
    extra_body: dict[str, Any] = Field(default_factory=dict)  # openai: extra request fields
    # openai: switch top-k and the repetition penalty off explicitly (vLLM/SGLang: top_k=-1,
    # repetition_penalty=1.0; llama.cpp: top_k=0, repeat_penalty=1.0) so a server does not fill them
    # from the checkpoint's generation_config (Qwen2.5-VL: top_k 1 = greedy every seed). auto: as the
    # server kind accepts them (nothing for OpenAI / DeepSeek / unknown servers); on: also for unknown.
    sampling_extras: Literal["auto", "on", "off"] = "auto"
    # openai: the server kind (decides how the fields above are spelled, and whether they are sent);
    # auto asks the server (vLLM /version, SGLang, llama.cpp) once. See octomed_data.inference.servers.
    server: Literal["auto", "openai", "deepseek", "vllm", "sglang", "llamacpp", "generic"] = "auto"
    # Fail the run when more than this share of requests failed (checked once
    # request_error_min_count replies are in, and on the whole run at the end): failed requests
    # score as wrong, so a flaky endpoint would otherwise pass for a weak model.
    max_request_error_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    request_error_min_count: int = Field(default=20, ge=1)

    precision: Precision = "auto"
    max_pixels: int = 262144
    shard_size: int = Field(default=1024, ge=1)  # predictions rows per committed Parquet shard
    work_dir: str | None = None  # local cache for a downloaded checkpoint and benchmark images

    @model_validator(mode="before")
    @classmethod
    def _deprecated_names(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not DEPRECATED_ENDPOINT_NAMES.keys() & data.keys():
            return data
        data = dict(data)
        for old, new in DEPRECATED_ENDPOINT_NAMES.items():
            if old in data:
                log.warning("evaluation setting %r is deprecated: use %r (the teachers' name)", old, new)
                value = data.pop(old)
                data.setdefault(new, value)
        return data

    def job(self, model: str, **more: Any) -> EvalConfig:
        """The evaluation of ``model`` (``more``: ``benchmarks`` or ``questions_uri``, ``output_uri``...)."""
        data = self.model_dump(exclude_unset=True) | {"model": model} | more
        return validate_config(EvalConfig, data, where="evaluation config")


class EvalConfig(EvalOptions):
    """One evaluation: a model (folder, checkpoint URI or endpoint URL), what to ask it, and the protocol.

    The sampling defaults are the OctoMed paper's evaluation protocol: temperature 0.6, top-p
    0.95, 5 seeds, up to 8192 new tokens, end of thinking forced when the budget runs out.
    Questions come from the benchmark registry (``benchmarks``, read from ``data_dir``) or from a
    QUESTION_SCHEMA dataset (``questions_uri``; each source is reported as a benchmark).
    """

    # A local model folder, an s3:// / file:// checkpoint (with checkpoint.json) or an http(s) endpoint.
    model: str = Field(validation_alias=AliasChoices("model", "checkpoint_uri"), min_length=1)
    benchmarks: list[str] | None = None  # registry names (evaluation.benchmarks.BENCHMARKS)
    questions_uri: str | None = None  # or: a QUESTION_SCHEMA dataset folder / *.parquet folder / file

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_input(self) -> EvalConfig:
        if bool(self.benchmarks) == bool(self.questions_uri):
            raise ValueError("give exactly one of benchmarks (registry names) or questions_uri (a dataset)")
        return self

    def config_hash(self) -> str:
        """Stable hash of everything that changes the numbers (not where they are written)."""
        payload = self.model_dump(mode="json", exclude={"output_uri", "work_dir", "name"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def checkpoint_uri(self) -> str:
        """The model location (the name the training flow and older configs use)."""
        return self.model

    def resolved_output_uri(self) -> str:
        from octomed_data.layout import CheckpointFolder

        if self.output_uri:
            return self.output_uri
        if self.model.startswith(("http://", "https://")):
            raise ConfigError("an endpoint model needs an output location: pass --out URI (output_uri)")
        return CheckpointFolder(self.model).evaluation(self.name)
