"""``octomed-data distill --ray`` on the Ray pool: :func:`run_distill` over every (or named) shard,
:func:`distill_shard_ray` for one shard (what the Ray tests call).

Kept out of :mod:`tasks.ray_executor`, which runs any stage and names none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.layout import DistillFolder, RunPaths
from octomed_data.stages import Runtime, ShardIncomplete, distill_run
from octomed_data.stages.distill import DistillStage
from octomed_data.stages.runner import cause, endpoint_keys
from octomed_data.teachers import DistillConfig
from tasks.ray_executor import RayExecutor, RayPool


def run_distill(
    questions_uri: str,
    out: str,
    config: DistillConfig,
    *,
    address: str | None = None,
    shards: Sequence[str] | None = None,
    api_keys: Mapping[str, str | SecretStr] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Distill every (or the given) shard on the Ray pool, then the filter stage (the CLI's run)."""
    executor = RayExecutor(address, progress=progress)
    return distill_run.run_distill(questions_uri, out, config, executor, shards=shards, api_keys=api_keys)


def distill_shard_ray(
    questions_uri: str,
    shard: str,
    out: str,
    config: DistillConfig,
    *,
    address: str | None = None,
    api_keys: Mapping[str, str | SecretStr] | None = None,
) -> dict[str, Any]:
    """Distill one shard on the Ray pool (writes ``OUT/raw``); returns the shard's report."""
    stage = DistillStage(RunPaths.at(out), config, questions=questions_uri, out=out, api_keys=api_keys)
    reused = False
    try:
        reused = (
            RayPool.get(address).run(stage, shard, Runtime(api_keys=endpoint_keys(stage))).state == "REUSED"
        )
    except Exception as exc:
        if not isinstance(cause(exc), ShardIncomplete):
            raise cause(exc) from None
    info = storage.Dataset(DistillFolder(out).raw).shard_info(shard)
    report = dict(info.extra.get("report") or {}) if info is not None else {}
    if reused:  # nothing was sent this time: every expected sample was already stored
        report.update(stored_before=report.get("expected", 0), new_samples=0, requests=0, retries=0)
        report.update(prompt_tokens=0, completion_tokens=0)
    return report
