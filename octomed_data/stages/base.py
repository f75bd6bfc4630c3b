"""The stage contract: every stage of the factory is run by the same executors in the same way.

A :class:`Stage` (learned from datatrove's ``PipelineStep`` + executors, with this project's typed
configs and atomic commits) says three things:

* :meth:`Stage.input_shards`: the shards it works on (the committed shards of its input dataset);
* :meth:`Stage.run_shard`: run one shard into committed outputs and return its counts. The
  *last* commit of a shard is its :meth:`Stage.done_dataset` shard, whose manifest marker carries
  the counts and the stage's :meth:`Stage.fingerprint`;
* :meth:`Stage.finalize`: the global step after the shards (statistics, summaries).

**The one done-signal** is that committed marker (:meth:`Stage.is_done`). Executors skip done
shards, re-run the rest, and never consult anything else (no cache, no state file). What an
executor adds is only *where* :func:`run_one` runs: this process (:mod:`.local`), a Prefect task
per shard, or a Ray actor pool (``tasks/``).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.errors import OctomedError
from octomed_data.layout import RunPaths
from octomed_data.stages.markers import MarkerView
from octomed_data.stages.outcomes import Outcomes, ShardOutcome
from octomed_data.stages.records import RECORD_KEYS, ended_state, interned, record_shard, shard_name

if TYPE_CHECKING:
    from octomed_data.teachers import TeacherConfig

MAX_ERROR_CHARS = 600
GLOBAL_SHARD = "all"  # the one "shard" of a stage that is a single global step (mixture, export)


class ShardIncomplete(OctomedError):
    """A shard finished with work still missing (e.g. teacher failures): retry or re-run it."""


class StageFailed(OctomedError):
    """Some shards of a stage failed; the others are committed. Re-run the failed ones alone."""


def describe_error(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """One line for a failure: the exception and its causes, no colour codes, bounded."""
    import re

    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = " ".join(str(cur).split()) if str(cur) else ""
        name = type(cur).__name__
        parts.append(f"{name}: {text}" if text else name)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    line = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", " <- caused by ".join(parts))
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(frozen=True)
class Runtime:
    """What an executor lends a stage in the process that runs its shard."""

    api_keys: Mapping[str, SecretStr] = field(default_factory=dict)  # by endpoint (teacher/judge) name
    limiter: Any | None = None  # a shared RateLimiter (octomed_data.inference.ratelimit protocol) or None
    progress: Any | None = None  # a progress callback/bar, or None


@dataclass
class StageResult:
    """One executor pass over a stage: per-shard outcomes, what is still not done, the finalize output."""

    stage: str
    # shard -> outcome: a dict, kept compactly (one per shard of the stage: see .outcomes)
    outcomes: MutableMapping[str, ShardOutcome] = field(default_factory=Outcomes)
    pending: list[str] = field(default_factory=list)  # input shards not done after this pass
    stale: list[str] = field(default_factory=list)  # outputs of vanished input shards, dropped
    final: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> dict[str, str]:
        if isinstance(self.outcomes, Outcomes):  # without building every REUSED outcome
            return self.outcomes.failed()
        return {s: o.error or "failed" for s, o in self.outcomes.items() if o.state == "FAILED"}

    def totals(self) -> dict[str, int]:
        """Sums of the integer counts over the shards."""
        out: dict[str, int] = {}
        for o in self.outcomes.values():
            for k, v in o.counts.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "shards": {s: o.to_dict() for s, o in sorted(self.outcomes.items())},
            "failed": self.failed,
            "pending": self.pending,
            "stale": self.stale,
            "totals": self.totals(),
            "final": self.final,
        }


# The look each stage is taking in a pass (by stage object; never pickled with it).
_VIEWS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
FINGERPRINT = ""  # in a look's views, where it keeps the stage's fingerprint (no dataset's uri)
_VIEWS_LOCK = threading.Lock()


class Stage(ABC):
    """One stage of the factory over one run (see the module docstring)."""

    name: ClassVar[str]
    #: A global step (mixture, export): one shard, rebuilt on every pass.
    global_step: ClassVar[bool] = False

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.paths.root!r})"

    # ---------------------------------------------------------------- one look per pass
    @contextlib.contextmanager
    def viewing(self) -> Iterator[Stage]:
        """While the block runs, the done and input datasets' markers are read once (a listing of
        each folder, each marker once) and every question below (:meth:`is_done`,
        :meth:`done_counts`, :meth:`input_shards`, :meth:`input_version`, :meth:`drop_stale`) is
        answered from that look: a few store requests per shard per pass, not one per question.
        The runner holds it only while no shard runs (never pickled with the stage)."""
        with _VIEWS_LOCK:
            previous = _VIEWS.get(self)
            _VIEWS[self] = {}
        try:
            yield self
        finally:
            with _VIEWS_LOCK:
                if previous is None:
                    _VIEWS.pop(self, None)
                else:
                    _VIEWS[self] = previous

    def looking(self) -> bool:
        """Whether a pass's look (:meth:`viewing`) is open on this stage."""
        with _VIEWS_LOCK:
            return self in _VIEWS

    def look_fingerprint(self) -> str | None:
        """:meth:`fingerprint`, computed once per look (settings do not change while no shard runs;
        a distill stage digests its whole config: ~0.1 ms, asked once per shard)."""
        with _VIEWS_LOCK:
            views = _VIEWS.get(self)
        if views is None:
            return self.fingerprint()
        if FINGERPRINT not in views:
            views[FINGERPRINT] = self.fingerprint()
        return views[FINGERPRINT]

    def _view(self, dataset: storage.Dataset | None) -> MarkerView | None:
        with _VIEWS_LOCK:
            views = _VIEWS.get(self)
        if views is None or dataset is None:
            return None
        with _VIEWS_LOCK:  # one look per dataset, even asked from several threads
            view = views.get(dataset.uri)
            if view is None:
                view = views[dataset.uri] = MarkerView(dataset)
            return view

    def done_info(self, shard: str) -> storage.ShardInfo | None:
        """The done dataset's committed marker of ``shard`` (from the pass's look when there is one)."""
        done = self.done_dataset()
        if done is None:
            return None
        view = self._view(done)
        return view.shard_info(shard) if view is not None else done.shard_info(shard)

    def done_basis(self, shards: Sequence[str], **extra: Any) -> str:
        """A digest of the commits of ``shards``' done markers and ``extra``: a finalize whose
        basis equals the one its last output recorded has nothing new to summarise (a re-run of
        a finished run then reads no shard's data again)."""
        import hashlib

        commits = {s: (i.committed_at if (i := self.done_info(s)) is not None else None) for s in shards}
        text = json.dumps({"commits": commits, "extra": extra}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def input_info(self, shard: str) -> storage.ShardInfo | None:
        """The input dataset's committed marker of ``shard`` (NotImplementedError: no input dataset)."""
        ds = self.input_dataset()
        view = self._view(ds)
        return view.shard_info(shard) if view is not None else ds.shard_info(shard)

    # ---------------------------------------------------------------- contract
    def input_shards(self) -> list[str]:
        """The shards this stage runs over (sorted)."""
        if self.global_step:
            return [GLOBAL_SHARD]
        ds = self.input_dataset()
        view = self._view(ds)
        return sorted(view.names()) if view is not None else ds.committed_names()  # names only held

    def input_dataset(self) -> storage.Dataset:
        raise NotImplementedError(f"{type(self).__name__} names no input dataset")

    def done_dataset(self) -> storage.Dataset | None:
        """The dataset whose committed shard marker says "this shard is done" (None: global step)."""
        return None

    def output_datasets(self) -> list[storage.Dataset]:
        """Every per-shard output dataset (for dropping the outputs of vanished input shards)."""
        done = self.done_dataset()
        return [done] if done is not None else []

    def lease_wait_s(self) -> float | None:
        """How long a runner waits for another writer's lease on a shard (None: two lease TTLs);
        a stage whose shards run for hours (training) waits for the one running."""
        return None

    def fingerprint(self) -> str | None:
        """Settings that make a committed shard current (None: any committed shard is)."""
        return None

    @abstractmethod
    def run_shard(self, shard: str) -> dict[str, Any]:
        """Run one shard into committed outputs (the done dataset last); return its counts."""

    def finalize(self, shards: Sequence[str]) -> dict[str, Any]:
        """The global step after all shards ran (statistics, summaries); default: nothing."""
        return {}

    def endpoints(self) -> list[TeacherConfig]:
        """The teachers/judges this stage calls (executors resolve their keys and rate limits)."""
        return []

    def bind(self, runtime: Runtime) -> Stage:
        """A copy of this stage using ``runtime`` (keys, shared limiter); default: the stage itself."""
        return self

    # ---------------------------------------------------------------- derived
    def input_version(self, shard: str) -> float | None:
        """When the input shard was committed (None: the stage reads no per-shard input)."""
        try:
            info = self.input_info(shard)
        except NotImplementedError:
            return None
        return info.committed_at if info is not None else None

    def marker_extra(self, shard: str, counts: dict[str, Any], **more: Any) -> dict[str, Any]:
        """What a stage puts in its done marker: counts, fingerprint, and the input commit it read."""
        return {
            "counts": counts,
            "fingerprint": self.fingerprint(),
            "input_committed_at": self.input_version(shard),
            **more,
        }

    def is_done(self, shard: str) -> bool:
        """The one done-signal: the shard's committed marker in the done dataset, for the current
        settings (fingerprint) and the current commit of its input shard (a re-written input, e.g.
        a re-distilled shard, makes the output stale); a marker saying ``"complete": False`` is not
        done."""
        done = self.done_dataset()
        if done is None:
            return False
        info = self.done_info(shard)  # committed: its marker and the file it names exist
        if info is None:
            return False
        if self._view(done) is None and not storage.exists(storage.join(done.uri, info.file)):
            return False
        wanted = self.look_fingerprint()
        if wanted is not None and info.extra.get("fingerprint") != wanted:
            return False
        if info.extra.get("complete") is False:  # committed with work still missing
            return False
        if "input_committed_at" in info.extra and info.extra["input_committed_at"] != self.input_version(
            shard
        ):
            return False
        return True

    def done_counts(self, shard: str) -> dict[str, Any]:
        info = self.done_info(shard)
        return interned(info.extra.get("counts") or {}) if info is not None else {}

    def drop_stale(self, inputs: Sequence[str]) -> list[str]:
        """Un-commit outputs of input shards that no longer exist (the one stale-shard cleaner);
        in a pass's look, a dataset's committed shards come from that one listing."""
        stale: set[str] = set()
        wanted = set(inputs)
        for ds in self.output_datasets():
            view = self._view(ds)
            if view is None:
                stale.update(ds.drop_stale(inputs))
                continue
            for name in view.names():
                if name not in wanted:
                    ds.delete_shard(name)
                    stale.add(name)
        return sorted(stale)

    def select(self, wanted: Sequence[str | int] | None) -> list[str]:
        """The shards to run: all inputs, or exactly those named (a name, a number, or a position)."""
        available = self.input_shards()
        if not wanted:
            return available
        names: list[str] = []
        for s in wanted:
            s = str(s)
            if s in available:
                names.append(s)
            elif s.isdigit() and shard_name(s) in available:
                names.append(shard_name(s))
            elif s.isdigit() and int(s) < len(available):
                names.append(sorted(available)[int(s)])  # N = position in the stage's shard list
            else:
                raise OctomedError(f"unknown {self.name} shard {s!r}; this run has {sorted(available)[:20]}")
        return names


def run_one(stage: Stage, shard: str, *, force: bool = False, attempt: int = 1) -> ShardOutcome:
    """Run one shard of ``stage`` unless it is done; every executor calls this (or :func:`arun_one`).

    Writes the attempt record (RUNNING, then COMPLETED with counts, or FAILED with the error) for
    the dashboard, and raises on failure (executors retry or report).
    """
    reused = _reused(stage, shard, force)
    if reused is not None:
        return reused
    t0 = _started(stage, shard, attempt)
    try:
        counts = stage.run_shard(shard)
    except BaseException as exc:
        _failed(stage, shard, attempt, t0, exc)
        raise
    return _completed(stage, shard, attempt, t0, counts)


async def arun_one(stage: Stage, shard: str, *, force: bool = False, attempt: int = 1) -> ShardOutcome:
    """:func:`run_one` on a running event loop (async actors): ``stage.arun_shard`` when it has one."""
    import asyncio

    reused = await asyncio.to_thread(_reused, stage, shard, force)
    if reused is not None:
        return reused
    t0 = await asyncio.to_thread(_started, stage, shard, attempt)
    try:
        arun = getattr(stage, "arun_shard", None)
        counts = await arun(shard) if arun is not None else await asyncio.to_thread(stage.run_shard, shard)
    except BaseException as exc:
        await asyncio.to_thread(_failed, stage, shard, attempt, t0, exc)
        raise
    return await asyncio.to_thread(_completed, stage, shard, attempt, t0, counts)


def _reused(stage: Stage, shard: str, force: bool) -> ShardOutcome | None:
    if force or not stage.is_done(shard):
        return None
    counts = stage.done_counts(shard)
    record_shard(stage.paths, stage.name, shard, "COMPLETED", reused=True, **_flat(counts))
    return ShardOutcome(shard, "REUSED", counts)


def _started(stage: Stage, shard: str, attempt: int) -> float:
    record_shard(stage.paths, stage.name, shard, "RUNNING", attempt=attempt)
    return time.time()


def _failed(stage: Stage, shard: str, attempt: int, t0: float, exc: BaseException) -> None:
    error = describe_error(exc) or type(exc).__name__
    seconds = round(time.time() - t0, 3)
    state = ended_state(exc)
    record_shard(stage.paths, stage.name, shard, state, attempt=attempt, error=error, seconds=seconds)


def _completed(stage: Stage, shard: str, attempt: int, t0: float, counts: dict[str, Any]) -> ShardOutcome:
    seconds = round(time.time() - t0, 3)
    record_shard(
        stage.paths, stage.name, shard, "COMPLETED", attempt=attempt, seconds=seconds, **_flat(counts)
    )
    return ShardOutcome(shard, "COMPLETED", counts, seconds=seconds)


def _flat(counts: dict[str, Any]) -> dict[str, Any]:
    """Counts that fit a table cell (nested dicts summarised by their total; lists and the attempt
    record's own keys left out)."""
    out: dict[str, Any] = {}
    for k, v in counts.items():
        if k in RECORD_KEYS or isinstance(v, list):
            continue
        if isinstance(v, dict):
            out[k] = sum(x for x in v.values() if isinstance(x, int | float))
        else:
            out[k] = v
    return out
