"""The Prefect executor: one Prefect task per shard of any stage, named after the stage and shard.

Each task runs :func:`~octomed_data.stages.run_one` (the same per-shard step as every executor),
in the flow's process or, for distillation, on the long-lived Ray pool (:mod:`tasks.ray_executor`).
No Prefect cache: the committed shard marker is the one done-signal, so a task re-run skips a done
shard by itself and a shard whose outputs were deleted by hand is rebuilt. Retries: transient
failures are retried with backoff; a :class:`~octomed_data.errors.ConfigError` (missing key, bad
setting) is not, because it fails the same way every time.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff

from octomed_data.errors import ConfigError
from octomed_data.runs import new_owner, record_shard, shard_lease
from octomed_data.stages import ShardOutcome, Stage, describe_error, run_one

RETRIES = 2
SHARD_LEASE_TTL_S = 15.0  # as tasks.ray_executor's: renewed every third of it while the shard runs


def _retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: a config error fails the same way on every attempt."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result itself cannot be read: treat as transient
        return True
    cause = getattr(exc, "cause", exc)  # a Ray task error wraps the shard's own exception
    return not isinstance(exc, ConfigError) and not isinstance(cause, ConfigError)


@task(
    name="shard",
    task_run_name="{label}",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retryable,
)
def shard_task(
    stage: Stage, shard: str, force: bool, label: str, ray: bool = False, ray_address: str | None = None
) -> dict[str, Any]:
    """Run one shard of ``stage`` (``label`` is the task run's name, e.g. ``distill medqa-00003``)."""
    ctx = TaskRunContext.get()
    attempt = ctx.task_run.run_count if ctx is not None else 1
    try:
        stage = bind_secrets(stage)
        if ray:
            from tasks.ray_executor import RayPool

            # The shard runs in a Ray actor (its log lines stay there): what it puts on its
            # attempt record while it runs (a batch's state) is logged here, in the task's logs.
            with watch_record(stage, shard, get_run_logger().info):
                outcome = RayPool.get(ray_address).run(stage, shard, force=force, attempt=attempt)
        else:
            lease = shard_lease(stage.paths, stage.name, shard, new_owner("prefect-task:"), SHARD_LEASE_TTL_S)
            with lease.hold(wait_s=2 * SHARD_LEASE_TTL_S):  # one writer per shard
                outcome = run_one(stage, shard, force=force, attempt=attempt)
    except BaseException as exc:
        # The shard's own failure is recorded by run_one; a failure around it (a missing key, a
        # Ray actor killed by the OOM killer) is recorded here, so no shard stays RUNNING.
        cause = getattr(exc, "cause", None) or exc
        record_failure(stage, shard, attempt, cause)
        raise cause from None
    return outcome.to_dict()


WATCHED = ("batch",)  # live fields of an attempt record worth a log line when they change


@contextlib.contextmanager
def watch_record(stage: Stage, shard: str, log: Callable[[str], Any], every_s: float = 5.0) -> Iterator[None]:
    """Log changes of the shard's live record fields (:data:`WATCHED`) every ``every_s`` while the
    block runs (a shard on a Ray actor, whose own log lines do not reach the Prefect UI)."""
    from octomed_data import storage

    uri = stage.paths.state_uri(stage.name, shard)
    stop = threading.Event()
    seen: dict[str, Any] = {}

    def poll() -> None:
        while not stop.wait(every_s):
            try:
                doc = storage.read_json(uri) if storage.exists(uri) else {}
            except Exception:  # a record being replaced: next time
                continue
            for field in WATCHED:
                if doc.get(field) is not None and doc.get(field) != seen.get(field):
                    seen[field] = doc[field]
                    log(f"{stage.name} {shard}: {field} {doc[field]}")

    thread = threading.Thread(target=poll, name=f"watch {stage.name} {shard}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 5)


def record_failure(stage: Stage, shard: str, attempt: int, exc: BaseException) -> None:
    """Mark this attempt FAILED unless run_one already did."""
    from octomed_data import storage

    uri = stage.paths.state_uri(stage.name, shard)
    current = storage.read_json(uri) if storage.exists(uri) else {}
    if current.get("state") == "FAILED" and current.get("attempt") == attempt:
        return
    record_shard(stage.paths, stage.name, shard, "FAILED", attempt=attempt, error=describe_error(exc))


def bind_secrets(stage: Stage) -> Stage:
    """A distill stage with every teacher's key resolved here, on the flow's machine.

    Keys come from Prefect Secret blocks or this process's environment and travel to Ray workers
    as ``SecretStr`` (never a flow parameter, log line or artifact), so worker nodes need no key
    in their own environment.
    """
    config = getattr(stage, "config", None)
    if config is None or not hasattr(stage, "with_runtime"):
        return stage
    return stage.with_runtime(api_keys=resolve_api_keys(config))


def resolve_api_keys(config: Any) -> dict[str, Any]:
    """Each teacher's key: its Prefect Secret block when it names one, else its env variable."""
    from pydantic import SecretStr

    from octomed_data.teachers import resolve_api_key

    keys: dict[str, Any] = {}
    for teacher in config.teachers:
        if teacher.name == "sandbox":
            keys[teacher.name] = SecretStr("sandbox-needs-no-key")
        elif teacher.api_key_secret:
            from prefect.blocks.system import Secret

            try:
                keys[teacher.name] = SecretStr(str(Secret.load(teacher.api_key_secret).get()))
            except ValueError as exc:  # block missing: say which one, not the traceback
                raise ConfigError(
                    f"Prefect Secret block {teacher.api_key_secret!r} for teacher {teacher.name!r}: {exc}"
                ) from None
        else:
            keys[teacher.name] = resolve_api_key(teacher)  # ConfigError in one line when unset
    return keys


class PrefectExecutor:
    """Submits one :func:`shard_task` per shard to the flow's task runner and collects outcomes."""

    def __init__(
        self,
        *,
        ray: bool = False,
        ray_address: str | None = None,
        on_outcome: Callable[[ShardOutcome], Any] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight  # None: as many as the flow's task runner takes
        self.ray = ray
        self.ray_address = ray_address
        self.on_outcome = on_outcome

    def map(self, stage: Stage, shards: Sequence[str], *, force: bool = False) -> dict[str, ShardOutcome]:
        queue = deque(shards)
        limit = self.max_in_flight or len(queue) or 1
        inflight: dict[Any, str] = {}
        out: dict[str, ShardOutcome] = {}
        while queue or inflight:
            while queue and len(inflight) < limit:  # at most max_in_flight shards at once
                s = queue.popleft()
                inflight[
                    shard_task.submit(stage, s, force, f"{stage.name} {s}", self.ray, self.ray_address)
                ] = s
            fut = next(as_completed(list(inflight)))
            shard = inflight.pop(fut)
            fut.wait()  # the final state, not the API's possibly older view of it
            if fut.state.is_completed():
                d = fut.result()
                out[shard] = ShardOutcome(
                    shard, d["state"], d.get("counts") or {}, d.get("error"), d["seconds"]
                )
            else:
                try:
                    fut.result(raise_on_failure=True)
                    error = fut.state.message or "failed"
                except BaseException as exc:
                    error = describe_error(getattr(exc, "cause", None) or exc)
                out[shard] = ShardOutcome(shard, "FAILED", error=error)
            if self.on_outcome is not None:
                self.on_outcome(out[shard])
        return out
