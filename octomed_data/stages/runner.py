"""The stage runner: what every executor does around one shard, written once.

* **Keys** (:func:`endpoint_keys`): each of ``stage.endpoints()``'s key, resolved once per pass
  where the executor runs (env, or a secret loader such as Prefect's Secret blocks) and lent to
  the stage by ``stage.bind(Runtime(...))`` where the shard runs.
* **One writer per shard** (:func:`run_guarded`, :func:`arun_guarded`): an attempt runs only
  while it holds the shard's lease (``state/<stage>/<shard>.lease``), renewed every third of its
  TTL; every data write checks it first (fencing), so a leftover writer whose lease was taken
  over publishes nothing more. A failure around the shard (the lease, the binding) is recorded
  too, so no shard stays RUNNING.
* **Shards in flight** (:func:`shard_limit`, :func:`drive`): the one bound on how many shards
  of a pass run at once (an executor's ``workers``/``max_in_flight``, else
  ``OCTOMED_MAX_SHARDS_IN_FLIGHT``, default 8; never "all"), and the one loop that keeps that
  many started, hands each completion only the in-flight handles (linear in shards) and streams
  each outcome on.
* **Retries** (:class:`RetryPolicy`): what is retryable (anything but a
  :class:`~octomed_data.errors.ConfigError`, which fails the same way every time), how many
  attempts, and the backoff. Local and Ray executors loop with :meth:`RetryPolicy.run`; the Prefect
  executor hands the same policy to Prefect's task retries (its UI shows every attempt).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Collection, Hashable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import SecretStr

from octomed_data.errors import ConfigError
from octomed_data.lease import LeaseHeld, new_owner, shard_lease
from octomed_data.stages.base import (
    Runtime,
    ShardOutcome,
    Stage,
    arun_one,
    describe_error,
    run_one,
)
from octomed_data.stages.outcomes import Outcomes
from octomed_data.stages.records import ended_state, record_shard

# A shard's lease TTL: a writer whose process died stops renewing it, so a restarted run takes the
# shard over at most this long after.
LEASE_TTL_S = float(os.environ.get("OCTOMED_SHARD_LEASE_TTL_S", "15"))


DEFAULT_MAX_SHARDS_IN_FLIGHT = 8

H = TypeVar("H", bound=Hashable)


def shard_limit(wanted: int | None = None) -> int:
    """How many shards of one pass may run at once: ``wanted`` (an executor's workers, a flow's
    ``max_in_flight``), else ``OCTOMED_MAX_SHARDS_IN_FLIGHT`` (default 8); at least one, never
    "as many as there are shards"."""
    if wanted is None or wanted <= 0:
        raw = os.environ.get("OCTOMED_MAX_SHARDS_IN_FLIGHT", "")
        try:
            wanted = int(raw) if raw.strip() else DEFAULT_MAX_SHARDS_IN_FLIGHT
        except ValueError:
            raise ConfigError(f"OCTOMED_MAX_SHARDS_IN_FLIGHT must be a whole number, not {raw!r}") from None
    return max(1, wanted)


def drive(
    shards: Iterable[str],
    limit: int,
    start: Callable[[str], H],
    next_done: Callable[[Collection[H]], H],
    finish: Callable[[str, H], ShardOutcome],
    on_outcome: Callable[[ShardOutcome], Any] | None = None,
) -> MutableMapping[str, ShardOutcome]:
    """The one in-flight loop of every executor: ``start(shard)`` for at most ``limit`` shards at
    a time (``shards`` is read lazily); ``next_done(in_flight)`` waits for one of the handles in
    flight (never more than ``limit`` of them, so a pass is linear in shards); ``finish`` turns
    it into the shard's outcome, which ``on_outcome`` sees as it comes. Only the in-flight
    handles and the outcomes (compactly: :class:`~.outcomes.Outcomes`) are kept."""
    limit = max(1, limit)
    pending = iter(shards)
    inflight: dict[H, str] = {}
    out = Outcomes()  # one per shard of the pass: kept compactly
    exhausted = False
    while True:
        while not exhausted and len(inflight) < limit:
            shard = next(pending, None)
            if shard is None:
                exhausted = True
                break
            inflight[start(shard)] = shard
        if not inflight:
            return out
        handle = next_done(inflight.keys())
        shard = inflight.pop(handle)
        out[shard] = outcome = finish(shard, handle)
        if on_outcome is not None:
            on_outcome(outcome)


def cause(exc: BaseException) -> BaseException:
    """The shard's own exception inside a transport's wrapper (a Ray task error's ``cause``)."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, BaseException) else exc


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed shard is tried again in one pass, and which failures are worth it."""

    retries: int = 2
    backoff_s: float = 2.0  # before retry n: backoff_s * 2**(n-1), up to half again as jitter

    @staticmethod
    def retryable(exc: BaseException) -> bool:
        return not isinstance(exc, ConfigError) and not isinstance(cause(exc), ConfigError)

    def delays(self) -> list[float]:
        return [self.backoff_s * 2**n for n in range(self.retries)]

    def run(self, shard: str, attempt: Callable[[int], ShardOutcome]) -> ShardOutcome:
        """``attempt(n)`` until it succeeds, fails for good, or the attempts are used up; never raises."""
        for n in range(1, self.retries + 2):
            try:
                return attempt(n)
            except Exception as exc:  # recorded by the attempt; the pass goes on with other shards
                if n > self.retries or not self.retryable(exc):
                    return ShardOutcome(shard, "FAILED", error=describe_error(cause(exc)))
                delay = self.delays()[n - 1]
                time.sleep(delay * (1 + random.random() / 2))
        raise AssertionError("unreachable")


RETRY = RetryPolicy()  # the Prefect executor's (flows); local and Ray (the CLI): no retry unless asked


def endpoint_keys(stage: Stage, load_secret: Callable[[str], str] | None = None) -> dict[str, SecretStr]:
    """The key of each endpoint ``stage`` calls: its secret (``load_secret(name)``, where the
    executor has a secret store and the endpoint names one), else its environment variable (a
    simulated teacher needs none: :func:`~octomed_data.teachers.resolve_api_key`).

    An endpoint whose key is nowhere here is left out: the stage fails in one line if it needs it.
    """
    from octomed_data.teachers import resolve_api_key

    keys: dict[str, SecretStr] = {}
    for endpoint in stage.endpoints():
        if endpoint.api_key_secret and load_secret is not None:
            try:
                keys[endpoint.name] = SecretStr(str(load_secret(endpoint.api_key_secret)))
            except ValueError as exc:  # block missing: say which one, not the traceback
                raise ConfigError(
                    f"secret {endpoint.api_key_secret!r} for teacher {endpoint.name!r}: {exc}"
                ) from None
            continue
        try:
            keys[endpoint.name] = resolve_api_key(endpoint)
        except ConfigError:
            continue
    return keys


def record_failure(stage: Stage, shard: str, attempt: int, exc: BaseException) -> None:
    """Mark this attempt FAILED unless :func:`run_one` already did (a failure around the shard)."""
    from octomed_data import storage

    uri = stage.paths.state_uri(stage.name, shard)
    try:
        current = storage.read_json(uri) if storage.exists(uri) else {}
    except Exception:
        current = {}
    if current.get("state") in ("FAILED", "CANCELLED") and current.get("attempt") == attempt:
        return
    error = describe_error(cause(exc))
    record_shard(stage.paths, stage.name, shard, ended_state(exc), attempt=attempt, error=error)


def run_guarded(
    stage: Stage,
    shard: str,
    runtime: Runtime | None = None,
    *,
    force: bool = False,
    attempt: int = 1,
    owner: str = "local:",
    ttl_s: float | None = None,
) -> ShardOutcome:
    """One attempt at one shard in this thread: bound to ``runtime``, holding the shard's lease
    (waiting up to two TTLs for another writer), every write fenced; raises the shard's error."""
    ttl = ttl_s or LEASE_TTL_S
    try:
        bound = stage.bind(runtime or Runtime())
        wait = stage.lease_wait_s() or 2 * ttl
        with shard_lease(stage.paths, stage.name, shard, new_owner(owner), ttl).hold(wait_s=wait):
            return run_one(bound, shard, force=force, attempt=attempt)
    except BaseException as exc:
        record_failure(stage, shard, attempt, exc)
        raise


async def arun_guarded(
    stage: Stage,
    shard: str,
    runtime: Runtime | None = None,
    *,
    force: bool = False,
    attempt: int = 1,
    owner: str = "async:",
    ttl_s: float | None = None,
) -> ShardOutcome:
    """:func:`run_guarded` on a running event loop (async actors)."""
    try:
        bound = stage.bind(runtime or Runtime())
        work = lambda: arun_one(bound, shard, force=force, attempt=attempt)  # noqa: E731
        ttl = ttl_s or LEASE_TTL_S
        wait = stage.lease_wait_s()
        return await run_fenced(stage, shard, work, ttl_s=ttl, owner=new_owner(owner), wait_s=wait)
    except BaseException as exc:
        await asyncio.to_thread(record_failure, stage, shard, attempt, exc)
        raise


async def run_fenced(
    stage: Stage,
    shard: str,
    work: Callable[[], Awaitable[Any]],
    *,
    ttl_s: float = LEASE_TTL_S,
    owner: str | None = None,
    wait_s: float | None = None,
) -> Any:
    """Await ``work()`` while holding the shard's lease: one writer per shard at a time.

    Waits (``wait_s``, default two TTLs) for a lease held by someone else to be released or to expire, renews it every
    ``ttl_s / 3`` while the shard runs, and cancels the shard the moment another owner has taken
    the lease over. Between heartbeats the fence stops it: every journal segment and shard commit
    checks the lease first (epoch fencing).
    """
    lease = shard_lease(stage.paths, stage.name, shard, owner or new_owner("async:"), ttl_s)
    await asyncio.to_thread(lease.acquire, wait_s or ttl_s * 2, min(1.0, ttl_s / 5))
    with lease.fence():  # the shard's task (and its writer tasks) check the lease before each write
        task = asyncio.ensure_future(work())
    lost: list[str] = []

    async def heartbeat() -> None:
        while not task.done():
            await asyncio.sleep(ttl_s / 3)
            try:
                ok = await asyncio.to_thread(lease.renew)
            except Exception:  # a store hiccup: the TTL leaves room for the next beat
                continue
            if not ok:
                holder = (await asyncio.to_thread(lease.read) or {}).get("owner")
                lost.append(f"{stage.name} shard {shard}: lost its lease to {holder!r}; stopped writing")
                task.cancel()
                return

    beat = asyncio.ensure_future(heartbeat())
    try:
        return await task
    except asyncio.CancelledError:
        if lost:
            raise LeaseHeld(lost[0]) from None
        raise
    finally:
        beat.cancel()
        if not lost:
            await asyncio.to_thread(lease.release)
