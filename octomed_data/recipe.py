"""The recipe: one YAML file that drives the whole factory.

A recipe names the sources to ingest, the store, decontamination settings, the teachers and their
routing, the number of samples, the mixture, the export formats, training and evaluation
settings, and whether finishing a mixture triggers training. :func:`load_recipe` turns YAML into
a validated :class:`Recipe` or raises one clear :class:`~octomed_data.errors.ConfigError` line.

Where a run's outputs go is :mod:`octomed_data.layout`; starting and re-opening runs is
:mod:`octomed_data.runs`. No Prefect or Ray here: flows call this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from octomed_data.audit import AuditSettings
from octomed_data.config import first_error, safe_load_capped
from octomed_data.errors import ConfigError
from octomed_data.job_config import EvalOptions, TrainOptions
from octomed_data.mixture import MixtureConfig
from octomed_data.rl.config import RLOptions
from octomed_data.teachers import (
    ROUTING_KEYS,
    SIMULATED_LABEL,
    DistillConfig,
    TeacherConfig,
    image_route_key,
    is_simulated,
)
from octomed_data.verify import VerifySettings

DEMO_RECIPE = "demo"
# The recipe lab's base recipe: the demo plus a small multimodal MCQ source written for the lab
# (PMC-VQA format over the bundled DICOM/NIfTI files, no benchmark image), so the source ablation
# has text, multimodal and classification traces on CPU. ``load_recipe("lab")``.
LAB_RECIPE = "lab"
LAB_OVERRIDES: dict[str, Any] = {
    "name": "lab",
    "store": "./runs/lab",
    "sources": [
        {
            "name": "figure_mcq",
            "format": "pmc_vqa",
            "input": "package:sample_data/lab/figure_mcq.csv",
            "images": "package:sample_data",  # its Figure_path names files under sample_data/
        }
    ],
}
SANDBOX_MODEL = "sandbox-not-a-model"
# A recipe teacher with no base_url uses this endpoint when set, else the loopback sandbox.
ENV_TEACHER_BASE_URL = "OCTOMED_TEACHER_BASE_URL"
ENV_TEACHER_MODEL = "OCTOMED_TEACHER_MODEL"
# What the environment's teacher reads: "text" or "text,image" (undeclared: no images unless routed).
ENV_TEACHER_MODALITIES = "OCTOMED_TEACHER_MODALITIES"


class SourceEntry(BaseModel):
    """One ingest entry: a file (or folder) in a named source format, with its images."""

    model_config = ConfigDict(extra="allow")  # format-specific options pass through to the loader

    format: str = Field(min_length=1)
    input: str = Field(min_length=1)
    images: str | None = None


class DecontamSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    registry: str | None = None  # None: the bundled benchmark registry pack
    phash_threshold: int = Field(6, ge=0, le=64)
    short_match: Literal["item", "text"] = "item"


class RecipeTeacher(TeacherConfig):
    """A teacher as a recipe names it; ``base_url: null`` means "the configured default endpoint"."""

    base_url: str | None = None  # type: ignore[assignment]
    model: str = SANDBOX_MODEL


class SandboxSettings(BaseModel):
    """Knobs of the loopback sandbox teacher (used only when no teacher endpoint is configured)."""

    model_config = ConfigDict(extra="forbid")

    latency_s: float = Field(0.0, ge=0)
    faults: dict[str, Any] = Field(default_factory=dict)  # octomed_data.sandbox.FaultConfig fields


class DistillSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(16, gt=0, le=1024)
    seed: int = 0
    max_attempts: int = Field(6, gt=0)
    ray_address: str | None = None  # None: local Ray; "ray://head:10001" or "auto" for a cluster
    max_concurrent_shards: int = Field(2, ge=1)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)


class ExportSettings(BaseModel):
    """How the mixture becomes training data (``octomed_data.export``)."""

    model_config = ConfigDict(extra="forbid")

    formats: list[Literal["llamafactory", "trl"]] = Field(default_factory=lambda: ["llamafactory", "trl"])
    # TRL: false (default) references the run's content-addressed image store (images stored once);
    # true writes a self-contained copy (PNG bytes in the Parquet).
    embed_images: bool = False
    # LLaMA-Factory: "relative" copies (hard-links where it can) each image once into
    # export/llamafactory/images/ and references it relative to that folder (its dataset_dir), so the
    # folder trains anywhere; "absolute" writes the run's image URIs (a shared filesystem only).
    llamafactory_images: Literal["relative", "absolute"] = "relative"
    # "normalize": each reply's final answer line becomes the system prompt's 'Final answer: \boxed{X}'
    # (reasoning untouched); "as_is": replies are kept and the system prompt states no answer format.
    answer_format: Literal["normalize", "as_is"] = "normalize"


def _typed(cls: type[BaseModel], v: Any) -> Any:
    """Validate a recipe's training/evaluation ``config`` block when the recipe loads (a typo or an
    out-of-range value fails before any stage runs), as one ``config: field: problem`` line."""
    if isinstance(v, cls):
        return v
    try:
        return cls.model_validate(v if v is not None else {})
    except ValidationError as exc:
        raise ValueError(first_error(exc)) from None


class TrainingSettings(BaseModel):
    """How the run trains: the job's settings (:class:`~octomed_data.job_config.TrainOptions`; the
    run's data and checkpoint folder are filled in per run) and how the job starts."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    tiny_model: Literal["text", "vl"] | None = None  # build a tiny random model offline (demo/tests)
    config: TrainOptions = Field(default_factory=TrainOptions)

    @field_validator("config", mode="before")
    @classmethod
    def _check_config(cls, v: Any) -> Any:
        return _typed(TrainOptions, v)

    @field_serializer("config")
    def _as_written(self, v: TrainOptions) -> dict[str, Any]:
        return v.model_dump(mode="json", exclude_unset=True)  # the recipe as written (run.json, fingerprints)

    # How the job starts: auto (= torchrun on this node), torchrun, deepspeed, inprocess, or ray
    # (Ray Train workers across a cluster). processes: per node, or Ray workers; None = one per GPU.
    launcher: Literal["auto", "inprocess", "torchrun", "deepspeed", "ray"] = "auto"
    processes: int | None = Field(default=None, ge=1)
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray


class EvalSettings(BaseModel):
    """The evaluation after training: registry benchmarks, or a question dataset, with the protocol
    and backend settings of :class:`~octomed_data.job_config.EvalOptions` (``config``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Registry names (``octomed-data eval --list``). Empty: evaluate a question dataset instead.
    benchmarks: list[str] = Field(default_factory=list)
    data_dir: str | None = None  # benchmark files; None: $OCTOMED_EVAL_DATA, else ../shared/data
    questions: str | None = None  # QUESTION_SCHEMA dataset; None: this run's decontaminated-away items
    config: EvalOptions = Field(default_factory=EvalOptions)  # protocol and backend settings

    @field_validator("config", mode="before")
    @classmethod
    def _check_config(cls, v: Any) -> Any:
        return _typed(EvalOptions, v)

    @field_serializer("config")
    def _as_written(self, v: EvalOptions) -> dict[str, Any]:
        return v.model_dump(mode="json", exclude_unset=True)


class ReleaseSettings(BaseModel):
    """Publishing the run as a dataset (``octomed_data.release``), after export when enabled."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    out: str | None = None  # where the release goes (path or s3://...); required when enabled
    all_responses: bool = False  # also the rejected responses, with their verdicts
    with_images: bool = False  # embed the images' pixels (datasets.Image) in the release rows
    licenses: dict[str, str] = Field(default_factory=dict)  # source -> licence id on the card

    @model_validator(mode="after")
    def _out_when_enabled(self) -> ReleaseSettings:
        if self.enabled and not self.out:
            raise ValueError("release.out is required when release.enabled is true")
        return self


class AutomationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_on_mixture: bool = True  # a completed mixture flow run triggers the training deployment


class Recipe(BaseModel):
    """Everything one factory run needs. Secrets are never here: only env var / secret block names."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("octomed", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    store: str = "./runs/demo"
    shard_size: int = Field(5000, gt=0)
    sources: list[SourceEntry] = Field(default_factory=list)
    sources_file: str | None = None  # YAML list of entries (or {entries: [...]}) added to ``sources``
    decontam: DecontamSettings = Field(default_factory=DecontamSettings)
    teachers: list[RecipeTeacher] = Field(default_factory=lambda: [RecipeTeacher(name=SIMULATED_LABEL)])
    routing: dict[str, str] = Field(default_factory=dict)
    distill: DistillSettings = Field(default_factory=DistillSettings)
    # How open-ended answers are verified, per source (octomed_data.verify): exact, normalized, judge.
    verify: VerifySettings = Field(default_factory=VerifySettings)
    # When the statistics pass flags a question's gold label (octomed_data.audit).
    audit: AuditSettings = Field(default_factory=AuditSettings)
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    export: ExportSettings = Field(default_factory=ExportSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    release: ReleaseSettings = Field(default_factory=ReleaseSettings)
    # Reinforcement learning after SFT (octomed_data.rl): its data, rewards and GRPO job; off by default.
    rl: RLOptions = Field(default_factory=RLOptions)
    automation: AutomationSettings = Field(default_factory=AutomationSettings)
    # Stages whose shards run on the Ray cluster (distill.ray_address, else $OCTOMED_RAY_ADDRESS, else
    # a local Ray) instead of the flow's own process: the filter and the global steps mixture and
    # export; the outputs are the same either way (tests/real/cluster). Distillation always runs there.
    ray_stages: list[Literal["filter", "mixture", "export"]] = Field(default_factory=list)
    base_dir: str | None = Field(None, description="Folder relative input paths resolve against.")

    @field_validator("teachers")
    @classmethod
    def _unique_names(cls, v: list[RecipeTeacher]) -> list[RecipeTeacher]:
        names = [t.name for t in v]
        if not v:
            raise ValueError("at least one teacher is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate teacher names: {names}")
        return v

    @model_validator(mode="after")
    def _check_routing(self) -> Recipe:
        # The same checks as DistillConfig's, when the recipe loads (not when distillation starts).
        names = {t.name: t for t in self.teachers}
        for key, name in self.routing.items():
            if key not in ROUTING_KEYS:
                raise ValueError(f"routing key {key!r} is not a task type, 'text' or 'multimodal'")
            if name not in names:
                raise ValueError(f"routing {key!r} -> unknown teacher {name!r}")
            if image_route_key(key) and names[name].takes_images is False:
                raise ValueError(
                    f"routing {key!r} sends images to teacher {name!r}, which reads text only "
                    "(modalities: [text]); route it to a teacher with modalities: [text, image]"
                )
        return self

    @model_validator(mode="after")
    def _judge_is_a_teacher(self) -> Recipe:
        judge = self.verify.judge
        if judge is not None and judge not in {t.name for t in self.teachers}:
            raise ValueError(f"verify.judge {judge!r} is not one of the recipe's teachers")
        return self

    # ---------------------------------------------------------------- derived settings
    def uses_sandbox(self) -> bool:
        """True when some teacher has no endpoint and the environment configures none either."""
        return any(t.base_url is None for t in self.teachers) and not os.environ.get(ENV_TEACHER_BASE_URL)

    def distill_config(self, sandbox_url: str | None = None) -> DistillConfig:
        """The distillation config with every teacher resolved to a real endpoint.

        Teachers without ``base_url`` take ``$OCTOMED_TEACHER_BASE_URL`` (model from
        ``$OCTOMED_TEACHER_MODEL``, modalities from ``$OCTOMED_TEACHER_MODALITIES``) or, when that is unset, the sandbox at ``sandbox_url``; all
        sandbox-bound teachers become the one teacher named ``sandbox`` so every row says so.
        """
        env_url = os.environ.get(ENV_TEACHER_BASE_URL)
        teachers: list[TeacherConfig] = []
        rename: dict[str, str] = {}
        for t in self.teachers:
            data = t.model_dump()
            if t.base_url is None and env_url:
                model = os.environ.get(ENV_TEACHER_MODEL) or (None if t.model == SANDBOX_MODEL else t.model)
                if not model:
                    raise ConfigError(f"{ENV_TEACHER_BASE_URL} is set: also set {ENV_TEACHER_MODEL}")
                data.update(base_url=env_url, model=model)
                modalities = os.environ.get(ENV_TEACHER_MODALITIES)
                if modalities and t.modalities is None:
                    data.update(modalities=[m.strip() for m in modalities.split(",") if m.strip()])
            elif t.base_url is None:
                if sandbox_url is None:
                    raise ConfigError(f"teacher {t.name!r} has no base_url and no sandbox teacher is running")
                rename[t.name] = SIMULATED_LABEL
                if any(is_simulated(x) for x in teachers):
                    continue
                data.update(name=SIMULATED_LABEL, base_url=sandbox_url, model=SANDBOX_MODEL, simulated=True)
                # The recipe's prices stay: the cost ledger prices sandbox replies at them and marks
                # the cost simulated (octomed_data.cost), so a demo shows what a real run would cost.
                data.update(api_key_secret=None)
                data.update(modalities=["text", "image"])  # the sandbox answers image questions too
            teachers.append(TeacherConfig(**data))
        routing = {k: rename.get(v, v) for k, v in self.routing.items()}
        try:
            return DistillConfig(
                teachers=teachers,
                routing=routing,
                samples=self.distill.samples,
                seed=self.distill.seed,
                max_attempts=self.distill.max_attempts,
            )
        except ValidationError as exc:
            raise ConfigError(f"invalid teachers/routing: {first_error(exc)}") from None

    def judge_teacher(self, config: DistillConfig) -> TeacherConfig | None:
        """The verifier's judge as resolved in ``config`` (:meth:`distill_config`'s), or None when
        no source uses it: ``verify.judge``, else the first teacher; a sandbox-bound one is ``sandbox``."""
        if not self.verify.needs_judge:
            return None
        name = self.verify.judge or self.teachers[0].name
        teacher = next(t for t in self.teachers if t.name == name)
        if teacher.base_url is None and not os.environ.get(ENV_TEACHER_BASE_URL):
            name = SIMULATED_LABEL
        return config.teacher(name)

    def public_dict(self) -> dict[str, Any]:
        """JSON-able recipe (it holds no secrets by construction)."""
        return self.model_dump(mode="json")

    def resolve_path(self, path: str) -> str:
        """Resolve an input path: ``package:...`` inside the installed package, a relative path
        against the recipe's folder; URIs and absolute paths pass through."""
        if path.startswith("package:"):
            return str(resources.files("octomed_data").joinpath(path.removeprefix("package:")))
        if "://" in path or os.path.isabs(path) or self.base_dir is None:
            return path
        return os.path.normpath(os.path.join(self.base_dir, path))

    def ingest_entries(self) -> list[dict[str, Any]]:
        """All ingest entries (``sources`` + ``sources_file``) with paths resolved."""
        entries = [e.model_dump(exclude_none=True) for e in self.sources]
        for entry in entries:  # the recipe's own entries: relative to the recipe (or package:)
            for key in ("input", "images"):
                if key in entry:
                    entry[key] = _hub_id_or(entry, key, self.resolve_path(entry[key]))
        if self.sources_file:
            path = self.resolve_path(self.sources_file)
            try:
                data = safe_load_capped(Path(path).read_text(encoding="utf-8"), f"sources_file {path}")
            except FileNotFoundError:
                raise ConfigError(f"sources_file not found: {path}") from None
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"sources_file {path} is not valid YAML: {str(exc).splitlines()[0]}"
                ) from None
            items = data.get("entries", data.get("sources")) if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise ConfigError(f"sources_file {path} must hold a list of entries")
            base = os.path.dirname(os.path.abspath(path))
            for item in items:
                try:
                    entry = SourceEntry.model_validate(item).model_dump(exclude_none=True)
                except ValidationError as exc:
                    raise ConfigError(f"invalid entry in {path}: {first_error(exc)}") from None
                for key in ("input", "images"):
                    if key in entry and "://" not in entry[key] and not os.path.isabs(entry[key]):
                        entry[key] = _hub_id_or(entry, key, os.path.normpath(os.path.join(base, entry[key])))
                entries.append(entry)
        if not entries:
            raise ConfigError("the recipe names no sources (set `sources` or `sources_file`)")
        return entries


def _hub_id_or(entry: Mapping[str, Any], key: str, resolved: str) -> str:
    """``resolved``, except for an ``hf`` input that is no file here: a hub id
    (``openlifescienceai/medmcqa``) stays as written, to be found in the local HF cache."""
    if entry.get("format") == "hf" and key == "input" and not os.path.exists(resolved):
        return str(entry[key])
    return resolved


def parse_recipe(data: Mapping[str, Any], where: str = "recipe", base_dir: str | None = None) -> Recipe:
    """Validate a recipe mapping; one-line :class:`ConfigError` on the first problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a YAML mapping, got {type(data).__name__}")
    data = dict(data)
    if base_dir is not None and data.get("base_dir") is None:
        data["base_dir"] = base_dir
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {where}: {first_error(exc)}") from None


def load_recipe(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Recipe:
    """Load a recipe YAML (``None`` or ``"demo"``: the embedded demo recipe), then apply overrides."""
    if path is None or str(path) in (DEMO_RECIPE, LAB_RECIPE):
        text = resources.files("octomed_data").joinpath("recipes/demo.yaml").read_text(encoding="utf-8")
        where, base_dir = f"embedded {path or DEMO_RECIPE} recipe", None
        if str(path) == LAB_RECIPE:
            overrides = _deep_merge(LAB_OVERRIDES, dict(overrides or {}))
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        text, where, base_dir = p.read_text(encoding="utf-8"), f"recipe {p}", str(p.resolve().parent)
    try:
        data = safe_load_capped(text, where) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if overrides:
        data = _deep_merge(data, overrides)
    return parse_recipe(data, where, base_dir)


def _deep_merge(base: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base) if isinstance(base, Mapping) else {}
    for k, v in extra.items():
        out[k] = (
            _deep_merge(out.get(k), v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
        )
    return out
