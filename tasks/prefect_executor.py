"""The Prefect executor: one Prefect task per shard of any stage, named after the stage and shard.

Each task runs one attempt through the stage runner (:mod:`octomed_data.stages.runner`: the
keys bound by ``stage.bind``, the shard's lease, fencing), in the flow's process or on the
long-lived Ray pool (:mod:`tasks.ray_executor`). No Prefect cache: the committed shard marker is
the one done-signal, so a task re-run skips a done shard by itself and a shard whose outputs were
deleted by hand is rebuilt. Retries: Prefect's task retries carry the runner's one
:class:`~octomed_data.stages.runner.RetryPolicy` (attempts, backoff, what is retryable), so the UI
shows every attempt.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.futures import as_completed

from octomed_data.errors import ConfigError
from octomed_data.stages import Runtime, ShardOutcome, Stage, describe_error
from octomed_data.stages.records import RECORD_KEYS
from octomed_data.stages.runner import (
    RETRY,
    cause,
    drive,
    endpoint_keys,
    record_failure,
    run_guarded,
    shard_limit,
)


def _retryable(task: Any, task_run: Any, state: Any) -> bool:
    """The runner's policy (:data:`~octomed_data.stages.runner.RETRY`) on the attempt's exception."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result itself cannot be read: treat as transient
        return True
    return not isinstance(exc, BaseException) or RETRY.retryable(exc)


@task(
    name="shard",
    task_run_name="{label}",
    cache_policy=NO_CACHE,
    retries=RETRY.retries,
    retry_delay_seconds=RETRY.delays(),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retryable,
)
def shard_task(
    stage: Stage,
    shard: str,
    force: bool,
    label: str,
    ray: bool = False,
    ray_address: str | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """One attempt at one shard of ``stage`` (``label`` is the task run's name, e.g. ``distill
    medqa-00003``); Prefect's retries are the transport of the runner's retry policy."""
    ctx = TaskRunContext.get()
    attempt = ctx.task_run.run_count if ctx is not None else 1
    if not ray:
        return run_guarded(
            stage, shard, runtime, force=force, attempt=attempt, owner="prefect-task:"
        ).to_dict()
    from tasks.ray_executor import RayPool

    try:
        # The shard runs in a Ray actor (its log lines stay there): what it puts on its attempt
        # record while it runs (a batch's state) is logged here, in the task's logs.
        with watch_record(stage, shard, get_run_logger().info):
            outcome = RayPool.get(ray_address).run(
                stage, shard, runtime=runtime, force=force, attempt=attempt
            )
    except BaseException as exc:  # a Ray actor killed by the OOM killer: no shard stays RUNNING
        record_failure(stage, shard, attempt, exc)
        raise cause(exc) from None
    return outcome.to_dict()


@contextlib.contextmanager
def watch_record(stage: Stage, shard: str, log: Callable[[str], Any], every_s: float = 5.0) -> Iterator[None]:
    """Log what a running shard puts on its attempt record (any field besides the runner's own,
    :data:`~octomed_data.stages.records.RECORD_KEYS`, e.g. a batch's state) as it changes, every
    ``every_s`` while the block runs (a shard on a Ray actor, whose log lines never reach Prefect)."""
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
            if doc.get("state") != "RUNNING":
                continue
            for field in sorted(set(doc) - RECORD_KEYS):
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


def load_secret(name: str) -> str:
    """A Prefect Secret block's value (keys never travel as flow parameters, logs or artifacts)."""
    from prefect.blocks.system import Secret

    return str(Secret.load(name).get())


def forget(fut: Any) -> None:
    """Let go of what the flow run keeps of a finished shard task once its outcome is read.

    Prefect's flow run context keeps, for the flow run's life, a copy of every task's final state
    keyed by its result's ``id`` (for tasks that pass results to other tasks: shard tasks never
    do), the thread pool's cancel event per task run, and a set of assets per task run: ~2.4 KB
    per task run, which made the driver grow with the shards (+50% from 1,000 to 10,000 shards
    through Prefect, issue 26). Only entries of this task run are removed.
    """
    ctx = FlowRunContext.get()
    if ctx is None:
        return
    run_id = fut.task_run_id
    # By task run, not by this result's id: a retried task's result read back is another object.
    # The scan is short: what is left are the entries of the tasks still in flight.
    for key in [k for k, entry in ctx.run_results.items() if entry[0].state_details.task_run_id == run_id]:
        del ctx.run_results[key]
    ctx.task_run_assets.pop(run_id, None)
    cancel_events = getattr(ctx.task_runner, "_cancel_events", None)  # ThreadPoolTaskRunner's
    if isinstance(cancel_events, dict):
        cancel_events.pop(run_id, None)


class PrefectExecutor:
    """Submits one :func:`shard_task` per shard to the flow's task runner, at most
    ``max_in_flight`` at once (:func:`~octomed_data.stages.runner.shard_limit`), and collects outcomes."""

    def __init__(
        self,
        *,
        ray: bool = False,
        ray_address: str | None = None,
        on_outcome: Callable[[ShardOutcome], Any] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight  # None: the runner's default (stages.runner.shard_limit)
        self.ray = ray
        self.ray_address = ray_address
        self.on_outcome = on_outcome

    def map(self, stage: Stage, shards: Sequence[str], *, force: bool = False) -> dict[str, ShardOutcome]:
        try:  # keys once, on the flow's machine; they reach the shard by stage.bind
            runtime = Runtime(api_keys=endpoint_keys(stage, load_secret))
        except ConfigError as exc:  # a missing secret block: every shard fails with it, no retry
            for s in shards:
                record_failure(stage, s, 1, exc)
            return {s: ShardOutcome(s, "FAILED", error=describe_error(exc)) for s in shards}
        limit = shard_limit(self.max_in_flight)  # never "all": the runner's one bound

        def start(s: str) -> Any:
            return shard_task.submit(
                stage, s, force, f"{stage.name} {s}", self.ray, self.ray_address, runtime
            )

        return drive(
            shards,
            limit,
            start,
            lambda inflight: next(as_completed(list(inflight))),
            outcome_of,
            self.on_outcome,
        )


def outcome_of(shard: str, fut: Any) -> ShardOutcome:
    """A finished :func:`shard_task` run as the shard's outcome (its error, when it failed)."""
    fut.wait()  # the final state, not the API's possibly older view of it
    forget(fut)
    if fut.state.is_completed():
        d = fut.result()
        return ShardOutcome(shard, d["state"], d.get("counts") or {}, d.get("error"), d["seconds"])
    try:
        fut.result(raise_on_failure=True)
        error = fut.state.message or "failed"
    except BaseException as exc:
        error = describe_error(getattr(exc, "cause", None) or exc)
    return ShardOutcome(shard, "FAILED", error=error)
