"""Ray executor for the distillation engine: async actors plus one global budget per teacher.

* :class:`TeacherBudget` is a named, detached actor holding every teacher's requests/tokens
  window (the library's :class:`~octomed_data.inference.ratelimit.WindowBudget`) for all actors on all
  machines. Workers lease permits in small chunks that expire, so the budget actor is asked
  a few times per second, not once per request.
* :class:`DistillWorker` is an async actor running :func:`~octomed_data.distill.adistill_shard`;
  ``max_concurrency`` bounds how many shards one actor runs at once, and each shard bounds its
  in-flight requests. A method call is idempotent (the journal skips stored samples), so Ray's
  at-least-once retries never pay twice for a stored sample.

The library (``octomed_data``) knows nothing of Ray; this module only wires it up.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from pydantic import SecretStr

from octomed_data.distill import ShardReport, adistill_shard, finalize, shard_names
from octomed_data.distill.run import summarize
from octomed_data.inference.ratelimit import LeasedRateLimiter, WindowBudget, lease_chunk, safety_margin
from octomed_data.teachers import DistillConfig

NAMESPACE = "octomed"
BUDGET_ACTOR = "octomed-teacher-budget"
LEASE_TTL_S = 0.5


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class TeacherBudget:
    """The global requests/tokens budget of every teacher (one named detached actor per cluster)."""

    def __init__(self) -> None:
        self._budgets: dict[str, WindowBudget] = {}
        self._limits: dict[str, tuple[Any, ...]] = {}

    def configure(self, limits: Mapping[str, tuple[int | None, int | None, float]]) -> None:
        """Add or update teachers' (rpm, tpm, window_s); idempotent."""
        for name, (rpm, tpm, window) in limits.items():
            if self._limits.get(name) != (rpm, tpm, window):
                # A lease may be spent up to its TTL after the grant: widen the window by that.
                margin = safety_margin(window) + LEASE_TTL_S
                self._budgets[name] = WindowBudget(rpm, tpm, window, margin_s=margin)
                self._limits[name] = (rpm, tpm, window)

    def lease(self, teacher: str, n: int, tokens_each: int, correction: int) -> tuple[int, float]:
        budget = self._budgets.get(teacher)
        if budget is None:
            return n, 0.0
        if correction:
            budget.correct(correction)
        return budget.take(n, tokens_each, time.monotonic())


def _limits(config: DistillConfig) -> dict[str, tuple[int | None, int | None, float]]:
    return {t.name: (t.rpm, t.tpm, t.rate_window_s) for t in config.teachers}


def budget_actor(config: DistillConfig):
    """The cluster's budget actor (created on first use, shared by every driver and worker)."""
    actor = TeacherBudget.options(
        name=BUDGET_ACTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
    ray.get(actor.configure.remote(_limits(config)))
    return actor


@ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)
class DistillWorker:
    """Runs the engine on shards; several at once up to the actor's ``max_concurrency``."""

    def __init__(self, budget: Any) -> None:
        self._budget = budget
        self._running: dict[tuple[str, str, str], asyncio.Future[dict[str, Any]]] = {}

    async def _lease(self, teacher: str, n: int, tokens_each: int, correction: int) -> tuple[int, float]:
        return await self._budget.lease.remote(teacher, n, tokens_each, correction)

    async def distill(
        self,
        questions_uri: str,
        shard: str,
        out: str,
        config: dict[str, Any],
        api_keys: Mapping[str, SecretStr] | None = None,
    ) -> dict[str, Any]:
        """Distill one shard; a duplicate call for a shard already running here awaits that run."""
        key = (questions_uri, shard, out)
        if key in self._running:
            return await asyncio.shield(self._running[key])
        cfg = DistillConfig.model_validate(config)
        chunks = {t.name: lease_chunk(t.rpm, t.rate_window_s, LEASE_TTL_S) for t in cfg.teachers}
        unlimited = {t.name for t in cfg.teachers if t.rpm is None and t.tpm is None}
        limiter = LeasedRateLimiter(self._lease, chunks, ttl_s=LEASE_TTL_S, unlimited=unlimited)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._running[key] = fut
        try:
            report = await adistill_shard(questions_uri, shard, out, cfg, api_keys=api_keys, limiter=limiter)
            fut.set_result(report.to_dict())
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            del self._running[key]
        return fut.result()


def _ensure_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it and should shut it down."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance
    ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    return address is None


def _secret_keys(api_keys: Mapping[str, str | SecretStr] | None) -> dict[str, SecretStr] | None:
    if api_keys is None:
        return None
    return {k: v if isinstance(v, SecretStr) else SecretStr(str(v)) for k, v in api_keys.items()}


def distill_shard_ray(
    questions_uri: str,
    shard: str,
    out: str,
    config: DistillConfig,
    *,
    address: str | None = None,
    api_keys: Mapping[str, str | SecretStr] | None = None,
) -> dict[str, Any]:
    """Distill one shard on a Ray async actor sharing the cluster's teacher budgets (Prefect calls this)."""
    _ensure_ray(address)
    budget = budget_actor(config)
    worker = DistillWorker.options(max_concurrency=2).remote(budget)
    try:
        return ray.get(
            worker.distill.remote(questions_uri, shard, out, config.public_dict(), _secret_keys(api_keys))
        )
    finally:
        ray.kill(worker)


def run_distill(
    questions_uri: str,
    out: str,
    config: DistillConfig,
    *,
    address: str | None = None,
    shards: Sequence[str] | None = None,
    api_keys: Mapping[str, str | SecretStr] | None = None,
    progress: bool = True,
    workers: int = 2,
    shards_per_worker: int = 2,
) -> dict[str, Any]:
    """Distill every (or the given) shard on a pool of Ray actors, then finalize stats and cost."""
    names = list(shards) if shards else shard_names(questions_uri)
    started_here = _ensure_ray(address)
    bar = None
    try:
        budget = budget_actor(config)
        pool = [
            DistillWorker.options(max_concurrency=shards_per_worker).remote(budget)
            for _ in range(max(1, min(workers, len(names))))
        ]
        keys = _secret_keys(api_keys)
        cfg = config.public_dict()
        if progress:
            import sys

            from tqdm import tqdm

            bar = tqdm(total=len(names), unit="shard", desc="distill (ray)", file=sys.stderr)
        pending = {
            pool[i % len(pool)].distill.remote(questions_uri, name, out, cfg, keys): name
            for i, name in enumerate(names)
        }
        reports: list[ShardReport] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                reports.append(ShardReport(**ray.get(ref)))
                if bar is not None:
                    bar.update(1)
        for actor in pool:
            ray.kill(actor)
        reports.sort(key=lambda r: r.shard)
        return summarize(reports, finalize(out, questions_uri, config))
    finally:
        if bar is not None:
            bar.close()
        if started_here:
            ray.shutdown()
