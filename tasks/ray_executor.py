"""Ray executor: a long-lived pool of async actors runs any stage's shards; one budget per teacher.

* :class:`TeacherBudget` is a named, detached actor holding every teacher's requests/tokens
  window (:class:`~octomed_data.inference.ratelimit.WindowBudget`) for all actors on all machines. Workers
  lease permits in small chunks that expire, so it is asked a few times per second, not per request.
* :class:`ShardWorker` is an async actor that runs the stage runner's
  :func:`~octomed_data.stages.runner.arun_guarded` (the same per-shard step every executor runs:
  lease, fencing, binding); ``max_concurrency`` shards at once, each bounding its own
  in-flight requests. A call is idempotent (the distill journal skips stored samples), so Ray's
  at-least-once retries never pay twice for a stored sample.
* :class:`RayPool` creates the actors once per process and cluster and reuses them for every
  shard and every stage run (no actor start per shard); its size comes from the cluster's CPUs.
  :class:`RayExecutor` is the stage executor on top of it (the Prefect executor uses the same pool).

The library (``octomed_data``) knows nothing of Ray; this module only wires it up, for any stage:
the budget's limits come from ``stage.endpoints()`` and reach the stage by ``stage.bind``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnschedulableError, RayActorError

from octomed_data import storage
from octomed_data.inference.ratelimit import LeasedRateLimiter, WindowBudget, lease_chunk, safety_margin
from octomed_data.stages import Runtime, ShardOutcome, Stage
from octomed_data.stages.local import map_shards
from octomed_data.stages.runner import RetryPolicy, arun_guarded, endpoint_keys, shard_limit

NAMESPACE = "octomed"
BUDGET_ACTOR = "octomed-teacher-budget"
LEASE_TTL_S = 0.5
SHARDS_PER_WORKER = 2


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

    def lease(
        self,
        teacher: str,
        n: int,
        tokens_each: int,
        correction: int,
        limits: tuple[int | None, int | None, float] | None = None,
    ) -> tuple[int, float]:
        """Up to ``n`` permits now (and how long to wait for more). ``limits`` travels with every
        call, so a restarted budget actor (its state lost with its process) knows the teacher's
        limits again from the first lease, not only after the next ``configure``."""
        if limits is not None and teacher not in self._limits:
            self.configure({teacher: tuple(limits)})
        budget = self._budgets.get(teacher)
        if budget is None:
            return n, 0.0
        if correction:
            budget.correct(correction)
        return budget.take(n, tokens_each, time.monotonic())


def _limits(stage: Stage) -> dict[str, tuple[int | None, int | None, float]]:
    return {t.name: (t.rpm, t.tpm, t.rate_window_s) for t in stage.endpoints()}


def budget_actor(stage: Stage | None = None):
    """The cluster's budget actor (created on first use, shared by every driver and worker)."""
    actor = TeacherBudget.options(
        name=BUDGET_ACTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
    if stage is not None and stage.endpoints():
        ray.get(actor.configure.remote(_limits(stage)))
    return actor


@ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)
class ShardWorker:
    """Runs shards of any stage; several at once up to the actor's ``max_concurrency``."""

    def __init__(self, budget: Any) -> None:
        self._budget = budget
        self._running: dict[tuple[str, str, str], asyncio.Future[ShardOutcome]] = {}

    def _limiter(self, stage: Stage) -> LeasedRateLimiter | None:
        """This worker's share of the cluster budget of the stage's endpoints (rpm, tpm, window)."""
        endpoints = stage.endpoints()
        if not endpoints:
            return None
        chunks = {t.name: lease_chunk(t.rpm, t.rate_window_s, LEASE_TTL_S) for t in endpoints}
        unlimited = {t.name for t in endpoints if t.rpm is None and t.tpm is None}
        limits = _limits(stage)
        budget = self._budget

        async def lease(teacher: str, n: int, tokens_each: int, correction: int) -> tuple[int, float]:
            return await budget.lease.remote(teacher, n, tokens_each, correction, limits.get(teacher))

        return LeasedRateLimiter(lease, chunks, ttl_s=LEASE_TTL_S, unlimited=unlimited)

    async def run(
        self,
        stage: Stage,
        shard: str,
        runtime: Runtime | None = None,
        force: bool = False,
        attempt: int = 1,
        lease_ttl_s: float | None = None,
    ) -> ShardOutcome:
        """One attempt at one shard through the runner (its lease, fencing), bound to the driver's
        keys and this worker's limiter; a duplicate call for a shard already running here awaits it."""
        key = (stage.name, stage.paths.root, shard)
        if key in self._running:
            return await asyncio.shield(self._running[key])
        fut: asyncio.Future[ShardOutcome] = asyncio.get_running_loop().create_future()
        self._running[key] = fut
        try:
            keys = runtime.api_keys if runtime is not None else {}
            outcome = await arun_guarded(
                stage,
                shard,
                Runtime(api_keys=keys, limiter=self._limiter(stage)),
                force=force,
                attempt=attempt,
                owner=f"ray-actor:{ray.get_runtime_context().get_actor_id()}:",
                ttl_s=lease_ttl_s,
            )
            await asyncio.to_thread(note_node, stage, shard, ray.get_runtime_context().get_node_id())
            fut.set_result(outcome)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            del self._running[key]
        return outcome


def note_node(stage: Stage, shard: str, node_id: str) -> None:
    """Add the Ray node that ran the shard to its attempt record (for people: where did it run)."""
    uri = stage.paths.state_uri(stage.name, shard)
    try:
        doc = storage.read_json(uri)
    except Exception:  # no record (a reused shard was never started): nothing to annotate
        return
    storage.write_json(uri, doc | {"node_id": node_id})


def ensure_ray(address: str | None) -> bool:
    """Connect to (or start) Ray once per process; True when this call started a local instance."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance
    ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    return address is None


# A call to a worker that is gone for good: its node died (hard affinity: it cannot move), or its
# restarts are used up. The pool replaces the worker and sends the shard again.
WORKER_GONE = (RayActorError, ActorUnschedulableError)
RESENDS = 3


def _on_node(i: int) -> Any:
    """Worker ``i`` is pinned to live node ``i mod nodes`` (hard affinity): every node runs shards.

    Soft affinity let Ray put all workers on one node when the other was slow to start workers
    (seen on a loaded machine); pinned, a worker whose node dies cannot be restarted elsewhere,
    so the pool replaces it on a live node (:meth:`RayPool.replace`).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    if not nodes:
        return "DEFAULT"
    return NodeAffinitySchedulingStrategy(node_id=nodes[i % len(nodes)], soft=False)


class RayPool:
    """Long-lived shard workers, created once per process (and Ray cluster) and reused for every shard."""

    _lock = threading.Lock()
    _pool: RayPool | None = None

    def __init__(self, size: int, shards_per_worker: int = SHARDS_PER_WORKER) -> None:
        self.size = size
        self.shards_per_worker = shards_per_worker
        self.job: str | None = None  # the Ray job (driver connection) the actors belong to
        self.workers = [self._new_worker(i) for i in range(size)]
        self._next = 0

    def _new_worker(self, i: int) -> Any:
        # Owned by this (driver) process, not detached: they die with it. One per node in turn
        # (pinned; SPREAD ignores 0-CPU actors).
        options = {"max_concurrency": self.shards_per_worker, "scheduling_strategy": _on_node(i)}
        return ShardWorker.options(**options).remote(budget_actor())

    def replace(self, dead: Any) -> None:
        """Swap a worker that is gone for good (restarts used up) for a new one."""
        with self._lock:
            for i, w in enumerate(self.workers):
                if w == dead:
                    self.workers[i] = self._new_worker(i)

    @classmethod
    def get(cls, address: str | None = None, size: int | None = None) -> RayPool:
        """The process's pool (connecting to Ray at ``address`` first); sized from the cluster's CPUs."""
        with cls._lock:
            ensure_ray(address)
            # A pool belongs to one Ray connection: after ray.shutdown() and a new ray.init() (another
            # cluster, a restarted head) its actor handles are dead, so build a new one.
            job = ray.get_runtime_context().get_job_id()
            if cls._pool is None or cls._pool.job != job:
                # At least one worker per live node (the resource view can lag a node that just
                # joined), else one per CPU of the cluster.
                cpus = int(ray.cluster_resources().get("CPU", 1))
                nodes = len([n for n in ray.nodes() if n.get("Alive")])
                cls._pool = RayPool(size or max(1, cpus, nodes))
                cls._pool.job = job
            return cls._pool

    @classmethod
    def reset(cls) -> None:
        """Kill the pool's actors (tests, or after ``ray.shutdown``)."""
        with cls._lock:
            if cls._pool is not None and ray.is_initialized():
                for w in cls._pool.workers:
                    ray.kill(w)
            cls._pool = None

    def _worker(self) -> Any:
        with self._lock:
            worker = self.workers[self._next % len(self.workers)]
            self._next += 1
            return worker

    def configure(self, stage: Stage) -> None:
        budget_actor(stage)

    def submit(
        self,
        stage: Stage,
        shard: str,
        runtime: Runtime | None = None,
        *,
        force: bool = False,
        attempt: int = 1,
    ) -> tuple[Any, Any]:
        """Send one attempt at one shard to the next worker; returns (worker, object ref)."""
        worker = self._worker()
        return worker, worker.run.remote(stage, shard, runtime, force, attempt)

    def run(
        self,
        stage: Stage,
        shard: str,
        runtime: Runtime | None = None,
        *,
        force: bool = False,
        attempt: int = 1,
    ) -> ShardOutcome:
        """One attempt at one shard on the pool, waited for (raises the shard's error).

        A worker that died for good (its restarts used up, e.g. its node gone) is replaced and the
        shard sent once more to a live one: the journal makes that free for stored samples.
        """
        self.configure(stage)
        for resend in range(RESENDS + 1):
            worker, ref = self.submit(stage, shard, runtime, force=force, attempt=attempt)
            try:
                return ray.get(ref)
            except WORKER_GONE:
                if resend == RESENDS:
                    raise
                self.replace(worker)
        raise AssertionError("unreachable")


class RayExecutor:
    """Stage executor on the long-lived :class:`RayPool` (no Prefect; the CLI's ``--ray``): keys
    resolved here once; a failed shard is tried ``retries`` more times under the runner's
    :class:`~octomed_data.stages.runner.RetryPolicy`."""

    def __init__(self, address: str | None = None, progress: bool = False, retries: int = 0) -> None:
        self.pool = RayPool.get(address)
        self.progress = progress
        self.policy = RetryPolicy(retries=retries)  # as the local executor: the CLI fails fast

    def map(self, stage: Stage, shards: Sequence[str], *, force: bool = False) -> dict[str, ShardOutcome]:
        self.pool.configure(stage)
        runtime = Runtime(api_keys=endpoint_keys(stage))

        def one(shard: str) -> ShardOutcome:
            attempt = lambda n: self.pool.run(stage, shard, runtime, force=force, attempt=n)  # noqa: E731
            return self.policy.run(shard, attempt)

        # Threads only wait on Ray: as many as the pool runs at once (the runner's one bound).
        workers = shard_limit(len(self.pool.workers) * self.pool.shards_per_worker)
        return map_shards(one, shards, workers, f"{stage.name} (ray)" if self.progress else None)
