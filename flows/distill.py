"""Distill flow: N teacher replies per question, one Prefect task per shard, run on the Ray pool.

Shards fan out as Prefect tasks (bounded by ``distill.max_concurrent_shards``); each runs on the
long-lived Ray actor pool (:mod:`tasks.ray_executor`; local Ray by default, a cluster at
``distill.ray_address`` or ``$OCTOMED_RAY_ADDRESS``). When no teacher endpoint is configured, the
loopback sandbox teacher is started for the flow's lifetime: its rows say ``teacher=sandbox`` and
are not model traces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import RunParams, prepare, run_stage_flow
from flows.naming import run_name
from octomed_data.errors import StorageError
from octomed_data.recipe import Recipe
from octomed_data.stages.distill import DistillStage

SANDBOX_NOTICE = (
    "No teacher endpoint configured: using the SANDBOX teacher (loopback, deterministic). "
    "Its samples say teacher=sandbox and are NOT model traces."
)


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


# Threads only wait on Ray; how many shards run at once is the recipe's distill.max_concurrent_shards.
@flow(
    name="distill", flow_run_name=run_name, log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=64)
)
def distill_flow(run: RunParams = RunParams()) -> dict[str, Any]:
    """``RUN/decontaminate/questions`` -> ``RUN/distill/raw``, one Prefect task per shard."""
    from flows.startup import connect_ray

    recipe, paths = prepare(run)
    ray_address = recipe.distill.ray_address or os.environ.get("OCTOMED_RAY_ADDRESS") or None
    # Connect once, from the flow's thread (concurrent ray.init calls race); a local Ray that does
    # not start in time on a busy machine is started once more.
    connect_ray(ray_address)
    with teacher_endpoints(recipe) as config:
        stage = DistillStage(paths, config)
        if not stage.input_shards():
            raise StorageError(
                f"no decontaminated questions at {stage.questions}: run the decontaminate flow first"
            )
        result = run_stage_flow(
            stage, run, ray=True, ray_address=ray_address, max_in_flight=recipe.distill.max_concurrent_shards
        )
    return {
        "run_id": paths.run_id,
        "distill_uri": paths.distill,
        "shards": list(result.outcomes),
        "sandbox": recipe.uses_sandbox(),
        "cost_uri": (result.final or {}).get("cost_uri"),
    }
