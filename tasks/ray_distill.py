"""``octomed-data distill --ray``: a distill output folder run on the Ray pool (CLI helpers).

Kept out of :mod:`tasks.ray_executor`, which runs any stage and names none; the distill CLI
(``octomed_data/cli/distill.py``) is the intended home of these two functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.stages import Runtime, ShardIncomplete, raise_for_failures, run_stage
from octomed_data.stages.runner import cause, endpoint_keys
from octomed_data.teachers import DistillConfig
from tasks.ray_executor import RayExecutor, RayPool


def _stage(questions_uri: str, out: str, config: DistillConfig, api_keys: Any) -> Any:
    from octomed_data.stages.distill import DistillStage

    return DistillStage(RunPaths.at(out), config, questions=questions_uri, out=out, api_keys=api_keys)


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
    from octomed_data.distill import raw_uri

    stage = _stage(questions_uri, out, config, api_keys)
    keys = endpoint_keys(stage) | {
        k: SecretStr(str(v)) if not isinstance(v, SecretStr) else v for k, v in (api_keys or {}).items()
    }
    reused = False
    try:
        reused = RayPool.get(address).run(stage, shard, Runtime(api_keys=keys)).state == "REUSED"
    except Exception as exc:
        if not isinstance(cause(exc), ShardIncomplete):
            raise cause(exc) from None
    info = storage.Dataset(raw_uri(out)).shard_info(shard)
    report = dict(info.extra.get("report") or {}) if info is not None else {}
    if reused:  # nothing was sent this time: every expected sample was already stored
        report.update(stored_before=report.get("expected", 0), new_samples=0, requests=0, retries=0)
        report.update(prompt_tokens=0, completion_tokens=0)
    return report


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
    """Distill every (or the given) shard on the Ray pool, then the filter stage and the cost ledger."""
    from octomed_data.distill import finalize, shard_names
    from octomed_data.distill.run import shard_report, summarize

    names = list(shards) if shards else shard_names(questions_uri)
    stage = _stage(questions_uri, out, config, api_keys)
    result = run_stage(
        stage, RayExecutor(address, progress=progress), shards=names, force=False, finalize=False
    )
    reports = [r for r in (shard_report(out, s) for s in names) if r is not None]
    summary = summarize(reports, finalize(out, questions_uri, config), result.failed)
    if result.failed and not reports:
        raise_for_failures(result)
    return summary
