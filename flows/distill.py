"""Distill flow: N teacher samples per question, verified against gold, one task per shard on Ray.

Shards fan out as Prefect tasks (bounded by ``distill.max_concurrent_shards``); inside each,
``tasks.ray_distill.distill_shard_ray`` drives the engine's Ray actor pool (local Ray by
default, a cluster at ``distill.ray_address`` or ``$OCTOMED_RAY_ADDRESS``). When no teacher endpoint is configured, the
loopback sandbox teacher is started for the flow's lifetime: its rows say ``teacher=sandbox``
and are not model traces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import (
    RunParams,
    ShardFailures,
    artifact_key,
    configured,
    prepare,
    publish_shard_table,
    rerun_hint,
    wanted_shards,
)
from octomed_data import storage
from octomed_data.errors import StorageError
from octomed_data.recipe import Recipe
from tasks.stages import distill_shard_task

SANDBOX_NOTICE = (
    "No teacher endpoint configured: using the SANDBOX teacher (loopback, deterministic). "
    "Its samples say teacher=sandbox and are NOT model traces."
)


def ensure_ray(address: str | None) -> None:
    """Connect once, from the flow's thread: concurrent ``ray.init`` calls from shard threads race."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance
    ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)


@contextlib.contextmanager
def teacher_endpoints(recipe: Recipe) -> Iterator[Any]:
    """The distill config with real endpoints; starts (and stops) the sandbox when it is needed."""
    if not recipe.uses_sandbox():
        yield recipe.distill_config()
        return
    from octomed_data.sandbox import FaultConfig, start_sandbox

    get_run_logger().warning(SANDBOX_NOTICE)
    print(SANDBOX_NOTICE)
    handle = start_sandbox(
        latency_s=recipe.distill.sandbox.latency_s, faults=FaultConfig(**recipe.distill.sandbox.faults)
    )
    try:
        yield recipe.distill_config(sandbox_url=handle.base_url)
    finally:
        handle.stop()


@flow(name="distill", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def distill_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """``RUN/decontaminate/questions`` -> ``RUN/distill/{raw,accepted}``, one Prefect task per shard."""
    recipe, paths = prepare(run)
    questions = storage.Dataset(paths.questions)
    available = list(questions.manifest())
    if not available:
        raise StorageError(
            f"no decontaminated questions at {questions.uri}: run the decontaminate flow first"
        )
    shards = wanted_shards(run, available)
    progress_id = create_progress_artifact(
        0.0,
        key=artifact_key("distill-progress", paths.run_id),
        description=f"Distilled shards, run {paths.run_id}",
    )
    results: dict[str, Any] = {}
    failed: list[str] = []
    ray_address = recipe.distill.ray_address or os.environ.get("OCTOMED_RAY_ADDRESS") or None
    ensure_ray(ray_address)
    with teacher_endpoints(recipe) as config:
        task = configured(distill_shard_task, paths, refresh=bool(run.shards))
        futures = {task.submit(questions.uri, s, config, ray_address, paths): s for s in shards}
        for done, fut in enumerate(as_completed(list(futures)), start=1):
            shard = futures[fut]
            fut.wait()  # the final state, not the API's possibly older view of it
            if fut.state.is_completed():
                results[shard] = fut.result()
            else:
                failed.append(shard)
                get_run_logger().error("distill shard %s failed: %s", shard, fut.state.message)
            update_progress_artifact(progress_id, 100.0 * done / len(shards))
            publish_shard_table(paths, "distill")
    if failed:
        raise ShardFailures(
            f"{len(failed)} distill shard(s) failed: {sorted(failed)}; {rerun_hint(paths, sorted(failed))}"
        )
    # Shards not named in this run must already be done, or later stages would miss them.
    from octomed_data.distill import is_shard_done

    out = paths.stage("distill")
    pending = [s for s in available if s not in shards and not is_shard_done(out, s)]
    summary = {
        "run_id": paths.run_id,
        "distill_uri": out,
        "shards": shards,
        "pending_shards": pending,
        "sandbox": recipe.uses_sandbox(),
    }
    if pending:
        raise ShardFailures(f"shard(s) {pending} are not distilled yet; {rerun_hint(paths, pending)}")
    return summary
