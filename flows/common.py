"""What every flow shares: typed run parameters, opening the run, result storage, artifacts."""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

from prefect import Task, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from octomed_data import storage
from octomed_data.errors import OctomedError
from octomed_data.recipe import (
    Recipe,
    RunPaths,
    load_recipe,
    open_run,
    shard_name,
    shard_states,
    start_run,
)
from octomed_data.report import shard_table_rows

ENV_STORE = "OCTOMED_STORE"


class RunParams(BaseModel):
    """Which run a flow works on. The UI renders this as the flow's parameter form."""

    model_config = ConfigDict(extra="forbid")

    recipe_path: str = Field("demo", description="Recipe YAML path, or 'demo' for the embedded demo recipe.")
    run_id: str | None = Field(None, description="Existing run to continue; empty starts a new run.")
    store: str | None = Field(None, description="Override the recipe's store URI (file path or s3://...).")
    shards: list[str] | None = Field(
        None, description="Only these shards (names or numbers) in per-shard stages; empty = all."
    )


class ShardFailures(OctomedError):
    """Some shards failed; the others are committed. Re-run the failed ones alone."""


def prepare(run: RunParams) -> tuple[Recipe, RunPaths]:
    """Open the run named by ``run`` (its recorded recipe wins) or start a new one from the recipe."""
    store = run.store or os.environ.get(ENV_STORE)
    if run.run_id:
        recipe_store = store or load_recipe(run.recipe_path).store
        paths_probe = RunPaths(recipe_store, run.run_id)
        if storage.exists(paths_probe.run_json):
            return open_run(run.run_id, recipe_store)
    recipe = load_recipe(run.recipe_path)
    paths = start_run(recipe, run.run_id, store)
    return recipe, paths


def wanted_shards(run: RunParams, available: Sequence[str]) -> list[str]:
    """The shards to process: all, or exactly those named (a name, or a 0-based position)."""
    if not run.shards:
        return list(available)
    names = []
    for s in run.shards:
        s = str(s)
        if s in available:
            names.append(s)
        elif s.isdigit() and shard_name(s) in available:
            names.append(shard_name(s))
        elif s.isdigit() and int(s) < len(available):
            names.append(sorted(available)[int(s)])  # N = position in the run's shard list
        else:
            raise OctomedError(f"unknown shard {s!r}; this run has {sorted(available)[:20]}")
    return names


@functools.lru_cache(maxsize=16)
def _saved_block(uri: str, api_url: str) -> tuple[str, Any]:
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    name = "octomed-results-" + hashlib.sha256(uri.encode()).hexdigest()[:12]
    if "://" not in uri or uri.startswith("file://"):
        block: Any = LocalFileSystem(basepath=os.path.abspath(uri.removeprefix("file://")))
        slug = f"local-file-system/{name}"
    else:
        # Endpoint only; credentials stay in the environment (botocore reads them), never in a block.
        settings = {k: v for k, v in storage.storage_options(uri).items() if k != "config_kwargs"}
        block = RemoteFileSystem(basepath=uri, settings=settings)
        slug = f"remote-file-system/{name}"
    block.save(name, overwrite=True)  # Prefect needs result storage registered server-side
    return slug, block


def result_storage(paths: RunPaths) -> tuple[str, Any]:
    """Where Prefect persists task results and cache records: the run's own store (block slug, block)."""
    from prefect.settings import PREFECT_API_URL

    return _saved_block(paths.results, str(PREFECT_API_URL.value()))


def configured(task: Task, paths: RunPaths, *, refresh: bool = False) -> Task:
    """``task`` with results and cache keys kept in the run's store (and optionally a fresh cache)."""
    slug, _ = result_storage(paths)
    # Cache records live with the results (Prefect's default key storage is the result storage).
    return task.with_options(result_storage=slug, refresh_cache=refresh or None)


def artifact_key(kind: str, run_id: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{run_id}".lower()).strip("-")[:120]


def publish_shard_table(paths: RunPaths, stage: str | None = None) -> list[dict[str, Any]]:
    """Table artifact of shard states (counts, state, error) for the run."""
    rows = shard_table_rows(shard_states(paths, stage))
    if rows:
        create_table_artifact(
            rows,
            key=artifact_key("shards", paths.run_id),
            description=f"Shards of run {paths.run_id}" + (f" ({stage})" if stage else ""),
        )
    return rows


def publish_table(kind: str, paths: RunPaths, rows: list[dict[str, Any]], description: str) -> None:
    if rows:
        create_table_artifact(rows, key=artifact_key(kind, paths.run_id), description=description)


def publish_markdown(kind: str, paths: RunPaths, markdown: str, description: str) -> None:
    create_markdown_artifact(markdown, key=artifact_key(kind, paths.run_id), description=description)


def collect(futures: dict[str, Any], stage: str) -> tuple[dict[str, Any], list[str]]:
    """Wait for shard futures; results of the good ones and the names of failed ones (logged)."""
    logger = get_run_logger()
    results: dict[str, Any] = {}
    failed: list[str] = []
    for shard, fut in futures.items():
        fut.wait()
        if fut.state.is_completed():
            results[shard] = fut.result()
        else:
            failed.append(shard)
            logger.error("%s shard %s failed: %s", stage, shard, fut.state.message)
    return results, failed


def rerun_hint(paths: RunPaths, failed: Sequence[str]) -> str:
    shards = " ".join(f"--shard {s}" for s in failed)
    return f"re-run them alone: octomed-data rerun {paths.run_id} {shards} --store {paths.store}"
