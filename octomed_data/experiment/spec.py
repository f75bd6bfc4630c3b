"""The experiment spec: a base run whose distillation is reused, and the arms to compare.

Typed and validated when it loads (one ``error:`` line for a bad spec). An arm's selection is what
decides its training data; its ``training`` / ``evaluation`` overrides change how that data is
used. ``control`` is the paper's choice between comparing arms at the same number of optimizer
steps (``same_steps``) or the same number of epochs over each arm's own data (``same_epochs``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from octomed_data.config import first_error, read_yaml
from octomed_data.errors import ConfigError
from octomed_data.rl.config import GRPOSettings
from octomed_data.schema import TaskType

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"

# Source groups an arm may name instead of single sources (the paper's knowledge sources), and the
# task groups of the comparison: by whether the question has an image, whatever its task type (a
# VQA-RAD yes/no question with its image is multimodal); imaging classification is its task type.
SOURCE_GROUPS: dict[str, str] = {
    "text": "questions without an image (imaging classification aside)",
    "multimodal": "questions with an image (imaging classification aside)",
    "classification": "imaging classification (task type imaging_cls)",
    "all": "every question",
}
TASK_GROUPS = ("text", "multimodal", "classification")


def task_group(task_type: str, has_image: bool) -> str:
    """The one group (text / multimodal / classification) of a question: by image presence."""
    if task_type == TaskType.IMAGING_CLS:
        return "classification"
    return "multimodal" if has_image else "text"


Band = tuple[float, float]


def band_contains(band: Band, rate: float) -> bool:
    """``[low, high)``: half-open, so adjacent bands share no question; ``high`` 1.0 includes 1.0
    (the top band holds the questions the teacher always solved), ``low == high`` is that one value."""
    low, high = band
    return low <= rate < high or rate == high and (high == 1.0 or low == high)


def bands_overlap(a: Band, b: Band) -> bool:
    """Some pass rate lies in both bands (as :func:`band_contains` reads them)."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    if lo < hi:
        return True
    return lo == hi and band_contains(a, lo) and band_contains(b, lo)


class ArmTraining(BaseModel):
    """Training overrides of one arm (unset: the spec's, then the recipe's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int | None = Field(None, ge=1)
    num_train_epochs: float | None = Field(None, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    model_path: str | None = None
    seed: int | None = None


class ArmEvaluation(BaseModel):
    """Evaluation overrides of one arm: prompting and benchmarks (the protocol's seeds stay shared)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompting: Literal["cot", "direct"] | None = None
    benchmarks: list[str] | None = None
    # Learning curves: also evaluate the checkpoint saved every N optimizer steps (None: the spec's).
    every_steps: int | None = Field(None, ge=1)


class Arm(BaseModel):
    """One arm: which of the base run's accepted traces it trains on, and its overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    description: str = ""
    # Source names (``medqa``) or groups (text, multimodal, classification, all); None: every source.
    sources: list[str] | None = None
    # k traces per question; None: all of them. ``k_mode`` first_k_drawn (the paper's "1 vs 4 vs 16
    # samples per question"): the accepted traces among the first k samples drawn (sample index < k);
    # first_k_accepted: the first k accepted traces by sample index. Both nest: 1 ⊂ 4 ⊂ 16.
    samples_per_question: int | None = Field(None, ge=1)
    k_mode: Literal["first_k_drawn", "first_k_accepted"] = "first_k_drawn"
    # Keep questions whose pass rate (accepted / judged samples) lies in [low, high) (band_contains).
    pass_rate: tuple[float, float] | None = None
    teachers: list[str] | None = None
    # Which base distillation the arm selects from: a teacher of the spec's ``teachers`` (its own
    # distillation of the same questions, run ``<base_run>-<name>``); None: ``base_run``.
    teacher_run: str | None = None
    # What the arm trains on of each trace: ``reasoning`` (the teacher's reasoning and reply) or
    # ``answer_only`` (the answer line alone, under the direct system prompt: the paper's direct
    # answers). Part of the data: an answer-only arm never shares a checkpoint with a reasoning one.
    export: Literal["reasoning", "answer_only"] = "reasoning"
    training: ArmTraining = Field(default_factory=ArmTraining)
    evaluation: ArmEvaluation = Field(default_factory=ArmEvaluation)
    # Reinforcement learning after the arm's SFT: GRPO (the factory's verifier as the reward) on the
    # base run's RL prompts (the recipe's ``rl:`` block), once per arm; the RL checkpoint is what
    # the arm evaluates. ``rl_trainer``: overrides of the recipe's ``rl.trainer`` (GRPOSettings).
    rl: bool = False
    rl_trainer: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _band(self) -> Arm:
        if self.pass_rate is not None:
            low, high = self.pass_rate
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"pass_rate must be [low, high] within [0, 1], got {list(self.pass_rate)}")
        if self.rl_trainer is not None:
            if not self.rl:
                raise ValueError(f"arm {self.name!r}: rl_trainer is set but rl is not true")
            try:
                GRPOSettings.model_validate(self.rl_trainer)
            except ValidationError as exc:
                raise ValueError(f"arm {self.name!r}: rl_trainer: {first_error(exc)}") from None
        return self

    def selection(self) -> dict[str, Any]:
        """What decides the arm's data (its part of the arm's fingerprint)."""
        return self.model_dump(
            mode="json",
            include={
                "sources",
                "samples_per_question",
                "k_mode",
                "pass_rate",
                "teachers",
                "teacher_run",
                "export",
            },
        )


class Expectation(BaseModel):
    """The paper's reported direction of an effect, shown beside the measured one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arm: str
    metric: str = "macro"  # a benchmark name, or macro (the mean over benchmarks)
    direction: Literal["up", "down", "same"]
    paper: str  # what the paper reports, in words (e.g. "CoT +15 points on reasoning tasks")


class SpecTraining(BaseModel):
    """Training shared by every arm; ``control`` decides steps vs epochs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int | None = Field(None, ge=1)  # same_steps: every arm trains this many steps
    num_train_epochs: float | None = Field(None, gt=0)  # same_epochs: every arm this many epochs
    learning_rate: float | None = Field(None, gt=0)
    report_to: Literal["none", "tensorboard"] = "tensorboard"


class SpecEvaluation(BaseModel):
    """The one evaluation protocol every arm is scored with (same seeds, same benchmarks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    benchmarks: list[str] | None = None  # None: the recipe's
    seeds: int | None = Field(None, ge=1)
    seed: int = 0
    limit: int | None = Field(None, ge=1)
    # Learning curves: evaluate an intermediate checkpoint every N optimizer steps (None: off), with
    # the same protocol; plotted against examples seen (learning_curves.png, comparison.json).
    every_steps: int | None = Field(None, ge=1)


class TeacherRun(BaseModel):
    """One teacher's distillation of the base run's questions: the recipe with ``overrides``
    (its ``teachers``, ``routing``, prices, ``distill`` settings; on CPU the sandbox's behaviour:
    ``distill.sandbox.faults``, ``distill.seed``), distilled and filtered once as run
    ``<base_run>-<name>``. Arms name it with ``teacher_run``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    description: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _same_questions(self) -> TeacherRun:
        changed = sorted(set(self.overrides) & {"sources", "sources_file", "decontam", "store", "shard_size"})
        if changed:
            raise ValueError(f"teacher {self.name!r} may not change the questions ({', '.join(changed)})")
        return self


class ExperimentSpec(BaseModel):
    """A study: one base run, several arms, one protocol, the report's reference arm."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    description: str = ""
    recipe: str = "lab"  # the recipe of the base run: a path, or demo / lab (embedded)
    base_run: str = Field(pattern=NAME)  # its run id in the recipe's store (built first when missing)
    store: str | None = None  # None: the recipe's store
    reference: str  # the arm every other arm is compared with
    control: Literal["same_steps", "same_epochs"] = "same_steps"
    training: SpecTraining = Field(default_factory=SpecTraining)
    evaluation: SpecEvaluation = Field(default_factory=SpecEvaluation)
    # Teachers compared on the same questions: one base distillation each (``Arm.teacher_run``).
    teachers: list[TeacherRun] = Field(default_factory=list)
    arms: list[Arm] = Field(min_length=2)
    expect: list[Expectation] = Field(default_factory=list)
    # Pass-rate bands of two arms may share questions only when this says so.
    allow_overlap: bool = False

    @model_validator(mode="after")
    def _check(self) -> ExperimentSpec:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate arm names: {names}")
        if self.reference not in names:
            raise ValueError(f"reference arm {self.reference!r} is not one of the arms {names}")
        for e in self.expect:
            if e.arm not in names:
                raise ValueError(f"expect: unknown arm {e.arm!r}")
        teachers = [t.name for t in self.teachers]
        if len(set(teachers)) != len(teachers):
            raise ValueError(f"duplicate teacher names: {teachers}")
        for a in self.arms:
            if a.teacher_run is not None and a.teacher_run not in teachers:
                raise ValueError(
                    f"arm {a.name!r}: teacher_run {a.teacher_run!r} is not one of the teachers {teachers}"
                )
        for a in self.arms:
            if a.rl and self.every_steps(a):
                raise ValueError(
                    f"arm {a.name!r}: an RL arm has no learning curve (its intermediate checkpoints are "
                    "SFT's): set evaluation.every_steps on the other arms only"
                )
        banded = [a for a in self.arms if a.pass_rate is not None]
        if not self.allow_overlap:
            for i, a in enumerate(banded):
                for b in banded[i + 1 :]:
                    if bands_overlap(a.pass_rate, b.pass_rate):  # type: ignore[arg-type]
                        raise ValueError(
                            f"pass_rate bands of arms {a.name!r} {list(a.pass_rate)} and {b.name!r} "  # type: ignore[arg-type]
                            f"{list(b.pass_rate)} overlap (bands are [low, high)); "  # type: ignore[arg-type]
                            "set allow_overlap: true if meant"
                        )
        if self.control == "same_steps" and self.training.max_steps is None:
            if any(a.training.max_steps is None for a in self.arms):
                raise ValueError("control same_steps needs training.max_steps (or max_steps on every arm)")
        if self.control == "same_epochs" and self.training.num_train_epochs is None:
            if any(a.training.num_train_epochs is None for a in self.arms):
                raise ValueError("control same_epochs needs training.num_train_epochs (or one per arm)")
        return self

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(
            f"experiment {self.name!r} has no arm {name!r} (arms: {[a.name for a in self.arms]})"
        )

    def arm_settings(self, arm: Arm, recipe: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Everything but the selected traces that decides an arm's result: the arm, control,
        protocol, the base run, and ``recipe`` (what of the recipe the arm uses: training, mixture,
        export and evaluation settings, the base model)."""
        # An arm without RL dumps as before the RL fields existed (its fingerprint is unchanged).
        plain = set() if arm.rl else {"rl", "rl_trainer"}
        settings = {
            "arm": arm.model_dump(mode="json", exclude={"name", "description"} | plain),
            "control": self.control,
            "training": self.training.model_dump(mode="json"),
            "evaluation": self.evaluation.model_dump(mode="json"),
            "recipe": self.recipe,
            "base_run": self.base_run_of(arm),
            "recipe_settings": dict(recipe or {}),
        }
        if arm.teacher_run is not None:  # the teacher's distillation settings decide its data
            settings["teacher"] = self.teacher(arm.teacher_run).model_dump(mode="json")
        return settings

    def base_run_of(self, arm: Arm) -> str:
        """The run an arm selects from: ``base_run``, or its teacher's ``<base_run>-<teacher>``."""
        return self.base_run if arm.teacher_run is None else f"{self.base_run}-{arm.teacher_run}"

    def teacher(self, name: str) -> TeacherRun:
        return next(t for t in self.teachers if t.name == name)

    def every_steps(self, arm: Arm) -> int | None:
        """The arm's learning-curve interval (its own, else the spec's; None: no curve)."""
        return arm.evaluation.every_steps or self.evaluation.every_steps

    def settings_fingerprint(self, arm: Arm, recipe: Mapping[str, Any] | None = None) -> str:
        blob = json.dumps(self.arm_settings(arm, recipe), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


READY_MADE = (
    "sources",
    "samples",
    "length",
    "cot",
    "difficulty",
    "samples_vs_epochs",
    "teacher",
    "sft_vs_rl",
)


def spec_path(ref: str) -> str:
    """``sources`` (a ready-made spec), ``package:...`` or a file path."""
    if ref in READY_MADE:
        return str(resources.files("octomed_data").joinpath(f"recipes/experiments/{ref}.yaml"))
    if ref.startswith("package:"):
        return str(resources.files("octomed_data").joinpath(ref.removeprefix("package:")))
    return ref


def parse_spec(data: Mapping[str, Any], where: str = "experiment spec") -> ExperimentSpec:
    try:
        return ExperimentSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(f"invalid {where}: {first_error(exc)}") from None


def load_spec(ref: str) -> ExperimentSpec:
    """Load and validate a spec (one ``ConfigError`` line when it is missing or invalid)."""
    path = spec_path(ref)
    if "://" not in path and not Path(path).exists():
        raise ConfigError(f"experiment spec not found: {ref} (ready-made: {', '.join(READY_MADE)})")
    data = read_yaml(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"experiment spec {path} must be a mapping")
    return parse_spec(data, where=f"experiment spec {ref}")
