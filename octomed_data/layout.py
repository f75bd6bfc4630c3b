"""The one run layout: every output of every stage, named once.

A run lives under ``STORE/runs/<run_id>/`` (or any folder: :meth:`RunPaths.at`, which the CLI uses
for ``--out``). Each stage writes only under its own folder and reads only what earlier stages
named here; nothing else in the code base spells a path (``tests/test_layout_paths.py``).

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
mixture        ``mixture/train``, ``validation``      ``mixture/_done`` (global step: settings +
                                                      the commits of its inputs)
export         ``export/llamafactory``, ``trl``       ``export/_done`` (likewise)
train          ``checkpoints/``                       ``checkpoints/final/checkpoint.json``
evaluate       ``evaluate/``                          ``evaluate/metrics.json``
report         ``report/report.{md,png}``             ``report/_done`` (likewise)
rl             ``rl/data``, ``rl/checkpoints``,       ``rl/data/_done``; ``rl/checkpoints/
               ``metrics.jsonl``, ``evaluate``        checkpoint.json``
=============  ===================================  ============================================

Each stage's folder has its own small layout (:class:`IngestFolder`, :class:`DecontamFolder`,
:class:`DistillFolder`, :class:`FilterFolder`, :class:`MixtureFolder`, ...), used the same way
whether the folder is a run's stage folder or a CLI ``--out``.

``state/<stage>/<shard>.json`` records attempts (running, failed with the error, seconds) for
the dashboard; it is never read to decide whether a shard is done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from octomed_data import storage

#: The factory's stages, in order (the CLI's ``--stage``, the factory flow's ``stages``, the dashboard).
STAGES = (
    "ingest",
    "decontaminate",
    "distill",
    "filter",
    "mixture",
    "export",
    "train",
    "checkpoint",
    "evaluate",
)
#: The folders a run's stages write (``train``/``checkpoint`` write ``checkpoints``).
STAGE_FOLDERS = (
    "ingest", "decontaminate", "distill", "filter", "mixture", "export", "checkpoints", "evaluate", "report", "rl",
)  # fmt: skip
SPLITS = ("train", "validation")  # the mixture's splits, and every export's
ENV_STORE = "OCTOMED_STORE"
DEFAULT_STORE = "./runs/demo"  # the demo recipe's store


def default_store(explicit: str | None = None, recipe_store: str | None = None) -> str:
    """The store a command uses: ``explicit`` (a flag or form field), else ``$OCTOMED_STORE``, else the
    recipe's store when one is at hand, else :data:`DEFAULT_STORE`."""
    return explicit or os.environ.get(ENV_STORE) or recipe_store or DEFAULT_STORE


def _at(*parts: str, doc: str | None = None) -> Any:
    """A property: ``<root>/<parts>`` of a folder class."""
    return property(lambda self: storage.join(self.root, *parts), doc=doc)


def _of(folder: type, stage: str, name: str, doc: str | None = None) -> Any:
    """A :class:`RunPaths` property: ``name`` of the stage folder's layout ``folder``."""
    return property(lambda self: getattr(folder(self.stage(stage)), name), doc=doc)


def journal_dir(folder: str, shard: str | None = None) -> str:
    """A request journal under ``folder``: ``_journal/`` (or one shard's ``_journal/<shard>/``)."""
    return storage.join(folder, "_journal", shard) if shard else storage.join(folder, "_journal")


def images_dir(root: str) -> str:
    """The content-addressed image store under ``root``: ``images/``."""
    return storage.join(root, "images")


def image_object(images: str, sha: str) -> str:
    """One stored image in an image folder: ``<sha[:2]>/<sha>.png``."""
    return storage.join(images, sha[:2], f"{sha}.png")


_DONE = "The step's done marker (a one-shard dataset, committed after its outputs)."


@dataclass(frozen=True)
class IngestFolder:
    """What the ingest stage writes under its folder (a run's ``ingest/``, or the CLI's ``--out``)."""

    root: str
    questions = _at("questions")
    quarantine = _at("quarantine")
    entries = _at("entries", doc="One committed shard per source entry: its counts; the done-signal.")
    summary = _at("ingest.json")


@dataclass(frozen=True)
class DecontamFolder:
    """What the decontaminate stage writes under its folder."""

    root: str
    kept = _at("questions")
    removed = _at("removed")
    index = _at("index.npz")
    summary = _at("decontam.json")


@dataclass(frozen=True)
class DistillFolder:
    """What the distill stage writes under its folder (the engine keeps its journal there too)."""

    root: str
    raw = _at("raw", doc="Every teacher reply (one row per expected sample), before any verdict.")
    cost = _at("cost.json")
    state = _at("_distill", doc="The engine's bookkeeping folder.")
    config = _at("_distill", "config.json", doc="The distill config as last run (never a key).")
    estimate = _at("_estimate", doc="Where ``estimate`` keeps its probe (an :class:`EstimateFolder`).")

    def journal(self, shard: str) -> str:
        """A shard's request journal: ``_journal/<shard>/`` (segments, deleted once compacted)."""
        return journal_dir(self.root, shard)

    def batches(self, shard: str) -> str:
        """A shard's Batch API records: ``_batches/<shard>/``."""
        return storage.join(self.root, "_batches", shard)

    def batch_record(self, shard: str, name: str) -> str:
        return storage.join(self.batches(shard), f"{name}.json")

    def teacher_n_support(self, teacher: str) -> str:
        """What a teacher's batch endpoint does with ``n``: ``_batches/_teachers/<teacher>.json``."""
        return storage.join(self.root, "_batches", "_teachers", f"{teacher}.json")


@dataclass(frozen=True)
class EstimateFolder:
    """The cost estimate's probe: a sample of questions and a small distill folder (``out``)."""

    root: str
    questions = _at("questions")
    out = _at("out")


@dataclass(frozen=True)
class DifficultyFolder:
    """What the difficulty filter writes under its ``--out`` (before distillation)."""

    root: str
    work = _at("difficulty", doc="Grading state: journal, ``scores`` dataset, summary.")
    scores = _at("difficulty", "scores")
    summary = _at("difficulty", "summary.json")
    filtered = _at("questions", doc="The kept questions when no other destination is given.")


@dataclass(frozen=True)
class FilterFolder:
    """What the filter stage (rejection sampling) writes under its folder."""

    root: str
    verdicts = _at("verdicts", doc="One row per sample: extracted answer, correct, reject reason.")
    accepted = _at("accepted", doc="Samples whose extracted answer equals the gold answer, full replies.")
    stats = _at("stats.json", doc="Per-source statistics: the one statistics pass the report also reads.")
    judge = _at("judge", doc="The verifier's LLM-judge folder (its journal: ``judge/_journal/<shard>/``).")
    judge_journal = _at("judge", "_journal")
    verify_history = _at("verify_history.jsonl", doc="Which verify settings produced which verdicts.")
    audit = _at("audit", doc="The gold-label audit: one row per question (majority answer, share, flag).")


@dataclass(frozen=True)
class MixtureFolder:
    """What the mixture step writes: ``train``, ``validation``, ``mixture.json`` (+ ``_work`` while it runs)."""

    root: str
    summary = _at("mixture.json")
    work = _at("_work", doc="Spill datasets while the mixture is built (deleted afterwards).")
    done = _at("_done", doc=_DONE)

    def split(self, name: str) -> str:
        return storage.join(self.root, name)

    def spill(self, name: str) -> str:
        """One spill dataset under ``_work`` (``samples``, ``questions``, ``shuffle-<split>``)."""
        return storage.join(self.work, name)


@dataclass(frozen=True)
class ExportFolder:
    """What the export step writes: ``llamafactory/``, ``trl/{text,vision}/<split>``, ``export.json``."""

    root: str
    summary = _at("export.json")
    done = _at("_done", doc=_DONE)
    llamafactory = _at("llamafactory")
    trl = _at("trl")

    def format(self, name: str) -> str:
        """One format's folder (``llamafactory`` or ``trl``)."""
        return storage.join(self.root, name)

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
    marker = _at("checkpoint.json", doc="The final checkpoint's marker.")
    intermediate = _at("checkpoints", doc="Intermediate checkpoints: ``checkpoints/checkpoint-<step>/``.")

    def step(self, name: str) -> str:
        return storage.join(self.intermediate, name)

    def evaluation(self, name: str) -> str:
        """Where an evaluation of this model goes when no output is given: ``eval/<name>``."""
        return storage.join(self.root, "eval", name)


@dataclass(frozen=True)
class RLFolder:
    """What reinforcement learning after SFT writes (a run's ``rl/``): its prompts with gold answers
    (``data/{train,validation}``, a global step with ``data/_done``), the GRPO job's checkpoints
    (``checkpoints/``, a :class:`CheckpointFolder`), its metrics and the RL checkpoint's evaluation."""

    root: str
    data = _at("data")
    data_summary = _at("data", "rl_data.json")
    data_done = _at("data", "_done", doc=_DONE)
    checkpoints = _at(
        "checkpoints", doc="The GRPO job's output: a CheckpointFolder (``checkpoint.json`` last)."
    )
    metrics = _at("metrics.jsonl", doc="Rewards, lengths and pass rates per logged step.")
    plot = _at("rl.png", doc="Reward and response length over steps.")
    evaluation = _at("evaluate", doc="The RL checkpoint's evaluation (an EvaluationFolder).")
    comparison = _at("sft_vs_rl.md", doc="SFT vs SFT+RL per benchmark, with bootstrap intervals.")
    judge = _at(
        "judge",
        doc="The reward's LLM-judge journal (``judge/_journal/<batch>/``), when the verify settings judge.",
    )

    def split(self, name: str) -> str:
        """One split of the RL prompts (``data/train`` or ``data/validation``)."""
        return storage.join(self.data, name)


@dataclass(frozen=True)
class EvaluationFolder:
    """What an evaluation writes under its output (a run's ``evaluate/``)."""

    root: str
    predictions = _at("predictions")
    metrics = _at("metrics.json")
    reasoning_plot = _at("reasoning_length.png")
    report = _at("report.md")

    def step(self, step: int) -> str:
        """An intermediate checkpoint's evaluation: ``steps/step-<N>/`` (learning curves)."""
        return storage.join(self.root, "steps", f"step-{step:06d}")


@dataclass(frozen=True)
class ReportFolder:
    root: str
    markdown = _at("report.md")
    plot = _at("report.png")
    done = _at("_done", doc=_DONE)


@dataclass(frozen=True)
class ReleaseFolder:
    """A published release (``octomed-data release RUN --out ROOT``): anywhere, not in the run."""

    root: str
    data = _at("data", doc="The release rows: ``data/<split>-<shard>.parquet`` (+ ``data/_manifest/``).")
    card = _at("README.md", doc="The dataset card (``README.md`` with YAML metadata), written last.")
    summary = _at("release.json")


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

    run_json = _at("run.json")
    results = property(
        lambda self: storage.join(self.store, "_prefect"), doc="Prefect task results (not data)."
    )
    checkpoint_record = _at(
        "checkpoint.json", doc="Which checkpoint this run produced (set when registered)."
    )
    latest_checkpoint = property(
        lambda self: storage.join(self.store, "checkpoints", "latest.json"),
        doc="The store-wide pointer to the newest registered checkpoint of any run.",
    )

    def local(self, name: str) -> str:
        """A folder under the run's root for things that must be local (models, work dirs)."""
        return storage.join(self.root, name)

    @staticmethod
    def tiny_model(kind: str) -> str:
        """Where the recipe's tiny base model is built, relative to the run's local folder."""
        return f"models/tiny-{kind}"

    # ------------------------------------------------------------ state (attempts, leases)
    def state_dir(self, stage: str) -> str:
        return storage.join(self.root, "state", stage)

    def state_uri(self, stage: str, shard: str) -> str:
        return storage.join(self.state_dir(stage), f"{shard}.json")

    def shard_lease(self, stage: str, shard: str) -> str:
        """The one-writer lease of a shard: ``state/<stage>/<shard>.lease``."""
        return storage.join(self.state_dir(stage), f"{shard}.lease")

    training_state = property(lambda self: self.state_dir("training"), doc="Training's bookkeeping.")
    checkpoint_lease = property(lambda self: storage.join(self.training_state, "checkpoints.lease"))

    def release_done(self, out: str) -> str:
        """``state/release/<hash of OUT>``: the done marker of a release published to ``out``,
        kept in the run, not in the published folder (whose every Parquet file is release rows)."""
        import hashlib

        return storage.join(self.state_dir("release"), hashlib.sha256(out.encode()).hexdigest()[:16])

    def shard_table(self, stage: str | None = None) -> str:
        """``report/shards[-<stage>].csv``: the full shard table a big run's summary card links."""
        return storage.join(self.report, f"shards-{stage}.csv" if stage else "shards.csv")

    def training_record(self, fingerprint: str) -> str:
        """``state/training/<export fingerprint>.json``: who trained (or trains) this export."""
        return storage.join(self.training_state, f"{fingerprint}.json")

    # ------------------------------------------------------------------ stages
    ingested = _of(IngestFolder, "ingest", "questions", doc="Questions as ingested (before decontamination).")
    quarantine = _of(IngestFolder, "ingest", "quarantine")
    ingest_entries = _of(IngestFolder, "ingest", "entries", doc="The ingest stage's done-signal.")
    questions = _of(DecontamFolder, "decontaminate", "kept", doc="Questions that go to the teachers.")
    removed = _of(DecontamFolder, "decontaminate", "removed")
    decontam_index = _of(DecontamFolder, "decontaminate", "index")
    distill = property(
        lambda self: self.stage("distill"), doc="``raw``, the journal and the engine's bookkeeping."
    )
    raw = _of(DistillFolder, "distill", "raw", doc="Every teacher reply, before any verdict.")
    cost = _of(DistillFolder, "distill", "cost")
    distill_config = _of(DistillFolder, "distill", "config")
    verdicts = _of(FilterFolder, "filter", "verdicts", doc="One row per sample (no reply text).")
    accepted = _of(FilterFolder, "filter", "accepted", doc="Accepted samples with their full replies.")
    stats = _of(FilterFolder, "filter", "stats", doc="The one statistics pass the report also reads.")
    verify_history = _of(FilterFolder, "filter", "verify_history")
    audit = _of(FilterFolder, "filter", "audit", doc="The gold-label audit, one row per question.")
    mixture = property(lambda self: self.stage("mixture"))
    mixture_train = property(lambda self: MixtureFolder(self.mixture).split("train"))
    mixture_validation = property(lambda self: MixtureFolder(self.mixture).split("validation"))
    mixture_summary = _of(MixtureFolder, "mixture", "summary")
    export = property(lambda self: self.stage("export"))
    export_summary = _of(ExportFolder, "export", "summary")
    checkpoints = property(lambda self: self.stage("checkpoints"))
    checkpoint_marker = _of(CheckpointFolder, "checkpoints", "marker", doc="The final checkpoint's marker.")
    evaluation = property(lambda self: self.stage("evaluate"))
    report = property(lambda self: self.stage("report"))
    rl = property(lambda self: self.stage("rl"), doc="Reinforcement learning after SFT (an RLFolder).")

    def trl_export(self, text_only: bool) -> str:
        """The TRL export folder training reads (``trl/text`` or ``trl/vision``)."""
        return ExportFolder(self.export).trl_config(text_only)

    def trl_split(self, text_only: bool, split: str = "train") -> str:
        """One split of the TRL export (``trl/<text|vision>/<split>``)."""
        return ExportFolder(self.export).trl_split(text_only, split)


@dataclass(frozen=True)
class ExperimentPaths:
    """Where a recipe-lab experiment lives: ``STORE/experiments/<name>/``."""

    store: str
    name: str

    @property
    def root(self) -> str:
        return storage.join(self.store, "experiments", self.name)

    spec_json = _at("spec.json")
    models = _at("models")
    tiny_model = _at("models", "tiny", doc="The one tiny base model every arm starts from.")
    report = _at("report.md")
    plot = _at("comparison.png")
    curves_plot = _at("learning_curves.png")
    comparison = _at("comparison.json")

    def arm(self, name: str) -> RunPaths:
        """The arm's run-shaped folder (the export, training and evaluation code take a RunPaths)."""
        return RunPaths.at(storage.join(self.root, "arms", name))

    def record(self, name: str) -> str:
        return storage.join(self.arm(name).root, "arm.json")

    def items(self, key: str) -> str:
        """Which evaluated benchmark items have an image, per protocol: ``items/<key>.json``."""
        return storage.join(self.root, "items", f"{key}.json")
