"""Distill stage: N teacher replies per question, journalled and resumable (:mod:`octomed_data.distill`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.cost import cost_ledger
from octomed_data.distill.compact import config_fingerprint
from octomed_data.distill.engine import adistill_shard
from octomed_data.inference.ratelimit import LocalRateLimiter
from octomed_data.layout import DistillFolder, RunPaths
from octomed_data.lease import LeaseHeld
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA
from octomed_data.stages.base import Runtime, ShardIncomplete, Stage
from octomed_data.teachers import DistillConfig, TeacherConfig

log = logging.getLogger("octomed_data.distill")


class DistillStage(Stage):
    """``decontaminate/questions`` -> ``distill/raw``; done = the raw shard's marker, complete, same config."""

    name = "distill"

    def __init__(
        self,
        paths: RunPaths,
        config: DistillConfig,
        *,
        questions: str | None = None,
        out: str | None = None,
        api_keys: Mapping[str, str | SecretStr] | None = None,
        limiter: Any = None,
        progress: Any = None,
        budgets: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(paths)
        self.config = config
        self.questions = questions or paths.questions
        self.out = out or paths.distill
        self.api_keys = dict(api_keys) if api_keys else None
        self.limiter = limiter
        self.progress = progress
        # Rate budgets shared by the shards this process runs one after another (each shard gets
        # its own limiter on its own event loop, over the same windows).
        self.budgets = budgets

    def __getstate__(self) -> dict[str, Any]:
        # Limiters and progress bars are per process; keys travel only as SecretStr.
        state = dict(self.__dict__)
        state.update(limiter=None, progress=None, budgets=None)
        return state

    def endpoints(self) -> list[TeacherConfig]:
        return list(self.config.teachers)

    def bind(self, runtime: Runtime) -> DistillStage:
        """A copy using this process's keys (the constructor's win), rate limiter and progress bar."""
        other = DistillStage(self.paths, self.config, questions=self.questions, out=self.out)
        keys = {**runtime.api_keys, **(self.api_keys or {})}
        other.api_keys = {
            k: v if isinstance(v, SecretStr) else SecretStr(str(v)) for k, v in keys.items()
        } or None
        other.limiter = runtime.limiter if runtime.limiter is not None else self.limiter
        other.budgets = self.budgets
        other.progress = runtime.progress if runtime.progress is not None else self.progress
        return other

    def input_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.questions, QUESTION_SCHEMA)

    def done_dataset(self) -> storage.Dataset:
        return storage.Dataset(DistillFolder(self.out).raw, SAMPLE_SCHEMA)

    def fingerprint(self) -> str | None:
        return config_fingerprint(self.config)

    async def arun_shard(self, shard: str) -> dict[str, Any]:
        """Distill one shard on the running event loop (Ray actors call this)."""
        quiet_lost_leases(asyncio.get_running_loop())
        limiter = self.limiter
        if limiter is None and self.budgets:
            limiter = LocalRateLimiter(self.budgets)
        report = await adistill_shard(
            self.questions,
            shard,
            self.out,
            self.config,
            api_keys=self.api_keys,
            limiter=limiter,
            progress=self.progress,
            on_batch_state=lambda text: self.show_batch_state(shard, text),
        )
        counts = {
            "questions": report.questions,
            "samples": report.expected,
            "new_samples": report.new_samples,
            "failed": report.failed,
            "requests": report.requests,
            "retries": report.retries,
        }
        if report.batch_state is not None:
            counts.update(
                batch=report.batch_state,
                batch_samples=report.batch_samples,
                batch_fallback=report.batch_fallback,
            )
        if not report.complete:
            raise ShardIncomplete(
                f"shard {shard}: {report.failed} sample(s) failed"
                + (f" ({report.aborted})" if report.aborted else "")
            )
        return counts

    def show_batch_state(self, shard: str, text: str) -> None:
        """Put a shard's batch states (``in_progress 1/2, completed 1/2``) on its attempt record,
        which the shard table shows while the shard waits for its batches."""
        uri = self.paths.state_uri(self.name, shard)
        doc = storage.read_json(uri) if storage.exists(uri) else {"stage": self.name, "shard": shard}
        doc["batch"] = text
        storage.write_json(uri, doc)
        log.info("%s %s: batch %s", self.name, shard, text)  # in the task's logs (flows forward them)

    def run_shard(self, shard: str) -> dict[str, Any]:
        return asyncio.run(self.arun_shard(shard))

    def finalize(self, shards: Any) -> dict[str, Any]:
        """The cost ledger over every committed raw shard (``distill/cost.json``); skipped when the
        raw shards are the ones the last ledger counted (its ``basis``)."""
        uri = DistillFolder(self.out).cost
        basis = self.done_basis(shards, config=self.config.model_dump(mode="json"))
        if storage.exists(uri):
            previous = storage.read_json(uri)
            if previous.get("basis") == basis:
                return {"cost_uri": uri, "cost": previous, "reused": True}
        cost = cost_ledger(DistillFolder(self.out).raw, self.config)
        cost["basis"] = basis
        storage.write_json(uri, cost)
        return {"cost_uri": uri, "cost": cost}


def quiet_lost_leases(loop: asyncio.AbstractEventLoop) -> None:
    """A shard that lost its lease stops writing: its request tasks end with the :class:`LeaseHeld`
    the fence raised, which the shard's own error already reports in one line. Say so in one log
    line instead of asyncio's "Task exception was never retrieved" traceback per task."""
    if loop.get_exception_handler() is not None:
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, LeaseHeld):
            log.warning("distill: a request task stopped: %s", exc)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
