"""The one run layout: every output of every stage, named once.

A run lives under ``STORE/runs/<run_id>/`` (or any folder: :meth:`RunPaths.at`, which the CLI uses
for ``--out``). Each stage writes only under its own folder and reads only what earlier stages
named here; nothing else in the code base spells a stage path.

=============  ===================================  ============================================
stage          outputs (under the run root)           done-signal (committed shard marker of)
=============  ===================================  ============================================
ingest         ``ingest/questions``, ``quarantine``,  ``ingest/entries`` (one shard per source
               ``images/``, ``ingest.json``           entry)
decontaminate  ``decontaminate/questions`` (kept),    ``decontaminate/removed`` (committed after
               ``removed``, ``index.npz``             the kept shard)
distill        ``distill/raw`` (every teacher reply), ``distill/raw`` (its ``extra`` carries the
               ``_journal/``, ``cost.json``           distill config fingerprint)
filter         ``filter/accepted``, ``verdicts``,     ``filter/verdicts``
               ``stats.json``, ``judge`` (journal)
mixture        ``mixture/train``, ``validation``      (global step: rebuilt on every pass)
export         ``export/llamafactory``, ``trl``       (global step: rebuilt on every pass)
train          ``checkpoints/``                       ``checkpoints/final/checkpoint.json``
evaluate       ``evaluate/``                          ``evaluate/metrics.json``
report         ``report/report.{md,png}``             (rebuilt on every run)
=============  ===================================  ============================================

Each stage's folder has its own small layout (:class:`IngestFolder`, :class:`DecontamFolder`,
:class:`DistillFolder`, :class:`FilterFolder`, :class:`MixtureFolder`), used the same way whether the folder is a run's stage folder or a CLI ``--out``.

``state/<stage>/<shard>.json`` records attempts (running, failed with the error, seconds) for
the dashboard; it is never read to decide whether a shard is done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from octomed_data import storage

STAGE_FOLDERS = (
    "ingest",
    "decontaminate",
    "distill",
    "filter",
    "mixture",
    "export",
    "checkpoints",
    "evaluate",
    "report",
)


@dataclass(frozen=True)
class IngestFolder:
    """What the ingest stage writes under its folder (a run's ``ingest/``, or the CLI's ``--out``)."""

    root: str

    @property
    def questions(self) -> str:
        return storage.join(self.root, "questions")

    @property
    def quarantine(self) -> str:
        return storage.join(self.root, "quarantine")

    @property
    def entries(self) -> str:
        """One committed shard per source entry: its counts; the ingest stage's done-signal."""
        return storage.join(self.root, "entries")

    @property
    def summary(self) -> str:
        return storage.join(self.root, "ingest.json")


@dataclass(frozen=True)
class DecontamFolder:
    """What the decontaminate stage writes under its folder."""

    root: str

    @property
    def kept(self) -> str:
        return storage.join(self.root, "questions")

    @property
    def removed(self) -> str:
        return storage.join(self.root, "removed")

    @property
    def index(self) -> str:
        return storage.join(self.root, "index.npz")

    @property
    def summary(self) -> str:
        return storage.join(self.root, "decontam.json")


@dataclass(frozen=True)
class DistillFolder:
    """What the distill stage writes under its folder (the engine keeps its journal there too)."""

    root: str

    @property
    def raw(self) -> str:
        """Every teacher reply (one row per expected sample), before any verdict."""
        return storage.join(self.root, "raw")

    @property
    def cost(self) -> str:
        return storage.join(self.root, "cost.json")

    @property
    def state(self) -> str:
        """The engine's bookkeeping folder (``_distill``)."""
        return storage.join(self.root, "_distill")

    @property
    def config(self) -> str:
        """The distill config as last run (teachers, models, sampling params; never a key)."""
        return storage.join(self.state, "config.json")

    def journal(self, shard: str) -> str:
        """A shard's request journal: ``_journal/<shard>/`` (segments, deleted once compacted)."""
        return journal_dir(self.root, shard)

    def batches(self, shard: str) -> str:
        """A shard's Batch API records: ``_batches/<shard>/``."""
        return storage.join(self.root, "_batches", shard)

    def batch_record(self, shard: str, name: str) -> str:
        """One batch's record: ``_batches/<shard>/<name>.json``."""
        return storage.join(self.batches(shard), f"{name}.json")

    def teacher_n_support(self, teacher: str) -> str:
        """What a teacher's batch endpoint does with ``n``: ``_batches/_teachers/<teacher>.json``."""
        return storage.join(self.root, "_batches", "_teachers", f"{teacher}.json")

    @property
    def estimate(self) -> str:
        """Where ``estimate`` keeps its probe (an :class:`EstimateFolder`): ``_estimate``."""
        return storage.join(self.root, "_estimate")


@dataclass(frozen=True)
class EstimateFolder:
    """The cost estimate's probe: a sample of questions and a small distill folder."""

    root: str

    @property
    def questions(self) -> str:
        return storage.join(self.root, "questions")

    @property
    def out(self) -> str:
        """A distill folder (:class:`DistillFolder`) for the probe's replies."""
        return storage.join(self.root, "out")


@dataclass(frozen=True)
class DifficultyFolder:
    """What the difficulty filter writes under its ``--out`` (before distillation)."""

    root: str

    @property
    def work(self) -> str:
        """Grading state: ``difficulty/`` (journal, ``scores`` dataset, summary)."""
        return storage.join(self.root, "difficulty")

    @property
    def scores(self) -> str:
        return storage.join(self.work, "scores")

    @property
    def summary(self) -> str:
        return storage.join(self.work, "summary.json")

    @property
    def filtered(self) -> str:
        """The kept questions when no other destination is given: ``questions``."""
        return storage.join(self.root, "questions")


@dataclass(frozen=True)
class FilterFolder:
    """What the filter stage (rejection sampling) writes under its folder."""

    root: str

    @property
    def verdicts(self) -> str:
        """One row per sample: extracted answer, correct, reject reason (no reply text)."""
        return storage.join(self.root, "verdicts")

    @property
    def accepted(self) -> str:
        """Samples whose extracted answer equals the gold answer, with their full replies."""
        return storage.join(self.root, "accepted")

    @property
    def stats(self) -> str:
        """Per-source statistics: the one statistics pass the report also reads."""
        return storage.join(self.root, "stats.json")

    @property
    def judge(self) -> str:
        """The verifier's LLM-judge journal (``judge/_journal/<shard>/``): judgements and their tokens."""
        return storage.join(self.root, "judge")

    @property
    def judge_journal(self) -> str:
        """``judge/_journal``: one folder of segments per shard."""
        return journal_dir(self.judge)

    @property
    def verify_history(self) -> str:
        """Which verify settings produced which verdicts: one JSON line per change and per settings."""
        return storage.join(self.root, "verify_history.jsonl")

    @property
    def audit(self) -> str:
        """The gold-label audit: one row per question (majority answer, share, flag), per verdicts shard."""
        return storage.join(self.root, "audit")


@dataclass(frozen=True)
class MixtureFolder:
    """What the mixture step writes: ``train``, ``validation``, ``mixture.json`` (+ ``_work`` while it runs)."""

    root: str

    def split(self, name: str) -> str:
        return storage.join(self.root, name)

    @property
    def summary(self) -> str:
        return storage.join(self.root, "mixture.json")

    @property
    def work(self) -> str:
        """Spill datasets while the mixture is built (deleted afterwards)."""
        return storage.join(self.root, "_work")

    def spill(self, name: str) -> str:
        """One spill dataset under ``_work`` (``samples``, ``questions``, ``shuffle-<split>``)."""
        return storage.join(self.work, name)

    @property
    def done(self) -> str:
        """The step's done marker (a one-shard dataset, committed after its outputs)."""
        return storage.join(self.root, "_done")


@dataclass(frozen=True)
class ExportFolder:
    """What the export step writes: ``llamafactory/``, ``trl/{text,vision}/<split>``, ``export.json``."""

    root: str

    @property
    def summary(self) -> str:
        return storage.join(self.root, "export.json")

    @property
    def done(self) -> str:
        """The step's done marker (a one-shard dataset, committed after its outputs)."""
        return storage.join(self.root, "_done")

    def format(self, name: str) -> str:
        """One format's folder (``llamafactory`` or ``trl``)."""
        return storage.join(self.root, name)

    @property
    def llamafactory(self) -> str:
        return self.format("llamafactory")

    @property
    def trl(self) -> str:
        return self.format("trl")

    def trl_config(self, text_only: bool) -> str:
        """The TRL configuration training reads (``trl/text`` or ``trl/vision``)."""
        return storage.join(self.trl, "text" if text_only else "vision")

    def trl_split(self, text_only: bool, split: str) -> str:
        return storage.join(self.trl_config(text_only), split)

    @staticmethod
    def dataset_info(folder: str) -> str:
        """A format folder's ``dataset_info.json``."""
        return storage.join(folder, "dataset_info.json")

    @staticmethod
    def format_summary(folder: str) -> str:
        """A format folder's own ``export.json``."""
        return storage.join(folder, "export.json")

    @staticmethod
    def card(folder: str) -> str:
        """A format folder's ``README.md`` (the TRL dataset card)."""
        return storage.join(folder, "README.md")


@dataclass(frozen=True)
class CheckpointFolder:
    """What training writes under its output (a run's ``checkpoints/``)."""

    root: str

    @property
    def marker(self) -> str:
        """The final checkpoint's marker (``checkpoint.json``)."""
        return storage.join(self.root, "checkpoint.json")

    @property
    def intermediate(self) -> str:
        """Intermediate checkpoints: ``checkpoints/checkpoint-<step>/``."""
        return storage.join(self.root, "checkpoints")

    def step(self, name: str) -> str:
        return storage.join(self.intermediate, name)


@dataclass(frozen=True)
class EvaluationFolder:
    """What an evaluation writes under its output (a run's ``evaluate/``)."""

    root: str

    @property
    def predictions(self) -> str:
        return storage.join(self.root, "predictions")

    @property
    def metrics(self) -> str:
        return storage.join(self.root, "metrics.json")

    @property
    def reasoning_plot(self) -> str:
        return storage.join(self.root, "reasoning_length.png")

    @property
    def report(self) -> str:
        return storage.join(self.root, "report.md")

    def step(self, step: int) -> str:
        """An intermediate checkpoint's evaluation: ``steps/step-<N>/`` (learning curves)."""
        return storage.join(self.root, "steps", f"step-{step:06d}")


@dataclass(frozen=True)
class ReportFolder:
    root: str

    @property
    def markdown(self) -> str:
        return storage.join(self.root, "report.md")

    @property
    def plot(self) -> str:
        return storage.join(self.root, "report.png")

    @property
    def done(self) -> str:
        """The step's done marker (a one-shard dataset, committed after its outputs)."""
        return storage.join(self.root, "_done")


def journal_dir(folder: str, shard: str | None = None) -> str:
    """A request journal under ``folder``: ``_journal/`` (or one shard's ``_journal/<shard>/``)."""
    return storage.join(folder, "_journal", shard) if shard else storage.join(folder, "_journal")


def images_dir(root: str) -> str:
    """The content-addressed image store under ``root``: ``images/``."""
    return storage.join(root, "images")


def image_object(images: str, sha: str) -> str:
    """One stored image in an image folder: ``<sha[:2]>/<sha>.png``."""
    return storage.join(images, sha[:2], f"{sha}.png")


@dataclass(frozen=True)
class ReleaseFolder:
    """A published release (``octomed-data release RUN --out ROOT``): anywhere, not in the run."""

    root: str

    @property
    def data(self) -> str:
        """The release rows: ``data/<split>-<shard>.parquet`` (+ ``data/_manifest/``)."""
        return storage.join(self.root, "data")

    @property
    def card(self) -> str:
        """The dataset card (``README.md`` with YAML metadata), written last."""
        return storage.join(self.root, "README.md")

    @property
    def summary(self) -> str:
        return storage.join(self.root, "release.json")

    @property
    def done(self) -> str:
        """The step's done marker (a one-shard dataset, committed after its outputs)."""
        return storage.join(self.root, "_done")


@dataclass(frozen=True)
class RunPaths:
    """Where one run's outputs live. ``root`` is ``STORE/runs/<run_id>`` unless built with :meth:`at`."""

    store: str
    run_id: str
    base: str | None = None  # an explicit root folder (CLI ``--out``); None: STORE/runs/<run_id>

    def __post_init__(self) -> None:
        # A relative local store ("./runs/demo") would put cwd-relative image paths into the
        # Parquet outputs and exports, which break as soon as they are read from elsewhere.
        if "://" not in self.store:
            object.__setattr__(self, "store", os.path.abspath(self.store))
        if self.base is not None and "://" not in self.base:
            object.__setattr__(self, "base", os.path.abspath(self.base))

    @classmethod
    def at(cls, root: str) -> RunPaths:
        """The layout rooted at ``root`` itself (``octomed-data distill ... --out ROOT``)."""
        name = root.rstrip("/").rsplit("/", 1)[-1] or "run"
        return cls(store=root, run_id=name, base=root)

    # ------------------------------------------------------------------ the run
    @property
    def root(self) -> str:
        return self.base if self.base is not None else storage.join(self.store, "runs", self.run_id)

    def stage(self, name: str) -> str:
        """A stage's folder (one of :data:`STAGE_FOLDERS`)."""
        if name not in STAGE_FOLDERS:
            raise ValueError(f"unknown stage folder {name!r}; known: {', '.join(STAGE_FOLDERS)}")
        return storage.join(self.root, name)

    @property
    def run_json(self) -> str:
        return storage.join(self.root, "run.json")

    @property
    def results(self) -> str:
        """Prefect task results for this store (orchestration bookkeeping, not data)."""
        return storage.join(self.store, "_prefect")

    def state_uri(self, stage: str, shard: str) -> str:
        return storage.join(self.state_dir(stage), f"{shard}.json")

    def state_dir(self, stage: str) -> str:
        return storage.join(self.root, "state", stage)

    def shard_lease(self, stage: str, shard: str) -> str:
        """The one-writer lease of a shard: ``state/<stage>/<shard>.lease``."""
        return storage.join(self.state_dir(stage), f"{shard}.lease")

    @property
    def training_state(self) -> str:
        """Training's bookkeeping: ``state/training/`` (not a shard stage)."""
        return self.state_dir("training")

    def training_record(self, fingerprint: str) -> str:
        """``state/training/<export fingerprint>.json``: who trained (or trains) this export."""
        return storage.join(self.training_state, f"{fingerprint}.json")

    @property
    def checkpoint_lease(self) -> str:
        return storage.join(self.training_state, "checkpoints.lease")

    def local(self, name: str) -> str:
        """A folder under the run's root for things that must be local (models, work dirs)."""
        return storage.join(self.root, name)

    def tiny_model(self, kind: str) -> str:
        """Where the recipe's tiny base model is built: ``models/tiny-<kind>`` (relative to the root)."""
        return f"models/tiny-{kind}"

    # ------------------------------------------------------------------ ingest
    @property
    def ingested(self) -> str:
        """Questions as ingested (before decontamination)."""
        return IngestFolder(self.stage("ingest")).questions

    @property
    def quarantine(self) -> str:
        return IngestFolder(self.stage("ingest")).quarantine

    @property
    def ingest_entries(self) -> str:
        """One committed shard per source entry: its counts; the ingest stage's done-signal."""
        return IngestFolder(self.stage("ingest")).entries

    @property
    def ingest_summary(self) -> str:
        return IngestFolder(self.stage("ingest")).summary

    @property
    def images_root(self) -> str:
        """The folder whose ``images/`` holds the content-addressed image store."""
        return self.stage("ingest")

    # ------------------------------------------------------------ decontaminate
    @property
    def questions(self) -> str:
        """Questions that go to the teachers: decontaminated (or copied when decontamination is off)."""
        return DecontamFolder(self.stage("decontaminate")).kept

    @property
    def removed(self) -> str:
        return DecontamFolder(self.stage("decontaminate")).removed

    @property
    def decontam_index(self) -> str:
        return DecontamFolder(self.stage("decontaminate")).index

    # ------------------------------------------------------------------ distill
    @property
    def distill(self) -> str:
        """The distill folder: ``raw``, the journal and the engine's bookkeeping live under it."""
        return self.stage("distill")

    @property
    def raw(self) -> str:
        """Every teacher reply (one row per expected sample), before any verdict."""
        return DistillFolder(self.distill).raw

    @property
    def cost(self) -> str:
        return DistillFolder(self.distill).cost

    @property
    def distill_config(self) -> str:
        return DistillFolder(self.distill).config

    # ------------------------------------------------- filter (rejection sampling)
    @property
    def verdicts(self) -> str:
        """One row per sample: extracted answer, correct, reject reason (no reply text)."""
        return FilterFolder(self.stage("filter")).verdicts

    @property
    def accepted(self) -> str:
        """Samples whose extracted answer equals the gold answer, with their full replies."""
        return FilterFolder(self.stage("filter")).accepted

    @property
    def stats(self) -> str:
        """Per-source statistics: the one statistics pass the report also reads."""
        return FilterFolder(self.stage("filter")).stats

    @property
    def verify_history(self) -> str:
        """``filter/verify_history.jsonl``: the verify settings the run's verdicts were made with, in turn."""
        return FilterFolder(self.stage("filter")).verify_history

    @property
    def audit(self) -> str:
        """``filter/audit``: the gold-label audit, one row per question (majority answer, flag)."""
        return FilterFolder(self.stage("filter")).audit

    # --------------------------------------------------------- mixture, export
    @property
    def mixture(self) -> str:
        return self.stage("mixture")

    @property
    def mixture_train(self) -> str:
        return MixtureFolder(self.mixture).split("train")

    @property
    def mixture_validation(self) -> str:
        return MixtureFolder(self.mixture).split("validation")

    @property
    def mixture_summary(self) -> str:
        return MixtureFolder(self.mixture).summary

    @property
    def export_summary(self) -> str:
        return ExportFolder(self.export).summary

    @property
    def export(self) -> str:
        return self.stage("export")

    def trl_export(self, text_only: bool) -> str:
        """The TRL export folder training reads (``trl/text`` or ``trl/vision``)."""
        return ExportFolder(self.export).trl_config(text_only)

    def trl_split(self, text_only: bool, split: str = "train") -> str:
        """One split of the TRL export (``trl/<text|vision>/<split>``)."""
        return ExportFolder(self.export).trl_split(text_only, split)

    # -------------------------------------------------- training and evaluation
    @property
    def checkpoints(self) -> str:
        return self.stage("checkpoints")

    @property
    def checkpoint_record(self) -> str:
        """Which checkpoint this run produced (written when training registers it)."""
        return storage.join(self.root, "checkpoint.json")

    @property
    def latest_checkpoint(self) -> str:
        """The store-wide pointer to the newest registered checkpoint of any run."""
        return storage.join(self.store, "checkpoints", "latest.json")

    @property
    def evaluation(self) -> str:
        return self.stage("evaluate")

    @property
    def report(self) -> str:
        return self.stage("report")

    @property
    def checkpoint_marker(self) -> str:
        """The final checkpoint's marker under ``checkpoints/``."""
        return CheckpointFolder(self.checkpoints).marker


@dataclass(frozen=True)
class ExperimentPaths:
    """Where a recipe-lab experiment lives: ``STORE/experiments/<name>/``."""

    store: str
    name: str

    @property
    def root(self) -> str:
        return storage.join(self.store, "experiments", self.name)

    @property
    def spec_json(self) -> str:
        return storage.join(self.root, "spec.json")

    @property
    def models(self) -> str:
        return storage.join(self.root, "models")

    @property
    def tiny_model(self) -> str:
        """The one tiny base model every arm starts from: ``models/tiny``."""
        return storage.join(self.models, "tiny")

    def arm(self, name: str) -> RunPaths:
        """The arm's run-shaped folder (the export, training and evaluation code take a RunPaths)."""
        return RunPaths.at(storage.join(self.root, "arms", name))

    def record(self, name: str) -> str:
        return storage.join(self.arm(name).root, "arm.json")

    def items(self, key: str) -> str:
        """Which evaluated benchmark items have an image, per protocol: ``items/<key>.json``."""
        return storage.join(self.root, "items", f"{key}.json")

    @property
    def report(self) -> str:
        return storage.join(self.root, "report.md")

    @property
    def plot(self) -> str:
        return storage.join(self.root, "comparison.png")

    @property
    def curves_plot(self) -> str:
        return storage.join(self.root, "learning_curves.png")

    @property
    def comparison(self) -> str:
        return storage.join(self.root, "comparison.json")
