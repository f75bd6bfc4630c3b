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
    def config(self) -> str:
        """The distill config as last run (teachers, models, sampling params; never a key)."""
        return storage.join(self.root, "_distill", "config.json")


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
    def verify_history(self) -> str:
        """Which verify settings produced which verdicts: one JSON line per change and per settings."""
        return storage.join(self.root, "verify_history.jsonl")

    @property
    def audit(self) -> str:
        """The gold-label audit: one row per question (majority answer, share, flag), per verdicts shard."""
        return storage.join(self.root, "audit")


@dataclass(frozen=True)
class MixtureFolder:
    root: str

    def split(self, name: str) -> str:
        return storage.join(self.root, name)


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
    def export(self) -> str:
        return self.stage("export")

    def trl_export(self, text_only: bool) -> str:
        """The TRL export folder training reads (``trl/text`` or ``trl/vision``)."""
        return storage.join(self.export, "trl", "text" if text_only else "vision")

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
