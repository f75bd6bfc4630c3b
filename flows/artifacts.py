"""The dashboard's artifacts: one per key, REPLACED on every pass, and summarised for big runs.

Prefect keeps every artifact created under a key as a new version, so a card published on every
pass over a run grew the database pass after pass (the shard tables doubled: 291 KB -> 2.0 MB from
100 to 1,000 shards). Every artifact here goes through :func:`replace_artifact`: the earlier
versions under its key are deleted before the new one is created, so a second pass over the same
run leaves the same artifacts (and bytes) as the first.

Shard tables: up to :data:`SHARD_TABLE_ROWS` shards the card is the table itself; past that it is a
summary (a table per stage: shards by state, counts and seconds summed; then the failed shards, at
most :data:`FAILED_ROWS` listed) and the full table is written as CSV into the run's ``report/``
folder, named and linked on the card.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from octomed_data.layout import RunPaths
from octomed_data.shard_table import FAILED_ROWS as FAILED_ROWS
from octomed_data.shard_table import SHARD_TABLE_ROWS as SHARD_TABLE_ROWS
from octomed_data.shard_table import shard_table

log = logging.getLogger("octomed_data.flows")


def artifact_key(kind: str, run_id: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{run_id}".lower()).strip("-")[:120]


def drop_artifacts(key: str) -> int:
    """Delete every artifact (every version) stored under ``key``; how many were deleted."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    dropped = 0
    with get_client(sync_client=True) as client:
        while True:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=200
            )
            for artifact in found:
                client.delete_artifact(artifact.id)
            dropped += len(found)
            if len(found) < 200:
                return dropped


def replace_artifact(key: str, create: Callable[[], Any]) -> Any:
    """``create()`` the artifact under ``key`` after deleting its earlier versions (a pass over a
    run replaces its cards, never appends to them). A failed clean-up is one warning line."""
    try:
        drop_artifacts(key)
    except Exception as exc:  # the card still gets published; the old version stays beside it
        log.warning("could not replace earlier versions of artifact %s: %s", key, exc)
    return create()


# Artifacts published in this process, per run: the factory run links them all on one card (the
# stages' artifacts belong to their subflow runs, so the factory's Artifacts tab would miss them).
_published: dict[str, dict[str, str]] = {}
_published_lock = threading.Lock()


def remember(paths: RunPaths, key: str, description: str) -> None:
    with _published_lock:
        _published.setdefault(paths.run_id, {})[key] = description


def published(paths: RunPaths) -> dict[str, str]:
    """Artifact keys (and descriptions) published for this run in this process."""
    with _published_lock:
        return dict(_published.get(paths.run_id, {}))


def artifact_index_markdown(paths: RunPaths, keys: dict[str, str]) -> str:
    lines = [f"# Artifacts of run `{paths.run_id}`", "", "| artifact | what |", "|---|---|"]
    lines += [f"| [{key}](/artifacts/key/{key}) | {desc} |" for key, desc in sorted(keys.items())]
    return "\n".join(lines + ["", f"Run folder: `{paths.root}`"])


def publish_artifact_index(paths: RunPaths) -> str:
    """One card on the factory run linking every stage's artifacts (tables, progress, report)."""
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key("artifacts", paths.run_id)
    markdown = artifact_index_markdown(paths, published(paths))
    description = f"Every artifact of run {paths.run_id}, with links"
    replace_artifact(key, lambda: create_markdown_artifact(markdown, key=key, description=description))
    return key


def publish_shard_table(paths: RunPaths, stage: str | None = None) -> int:
    """The shard card of one stage (``shards-<stage>-<run>``) or of the whole run (``shards-<run>``),
    published once when the stage (the run) ends and replacing the card of any earlier pass; how
    many shards it covers. Up to :data:`SHARD_TABLE_ROWS` shards the card is the table of shard
    states; past that a summary, the full table in ``report/shards[-<stage>].csv``
    (:func:`~octomed_data.shard_table.shard_table`: the records read one at a time)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    table = shard_table(paths, stage)
    if not table.total:
        return 0
    key = artifact_key(f"shards-{stage}" if stage else "shards", paths.run_id)
    description = f"Shards of run {paths.run_id}" + (f" ({stage})" if stage else "")
    if table.summary is None:
        rows = table.rows
        replace_artifact(key, lambda: create_table_artifact(rows, key=key, description=description))
    else:
        markdown = table.summary.markdown(table.table_uri, f"Shards of run `{paths.run_id}`")
        description += f": summary of {table.total} shards, full table in {table.table_uri}"
        replace_artifact(key, lambda: create_markdown_artifact(markdown, key=key, description=description))
    remember(paths, key, description)
    return table.total


def publish_table(kind: str, paths: RunPaths, rows: list[dict[str, Any]], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    if rows:
        key = artifact_key(kind, paths.run_id)
        replace_artifact(key, lambda: create_table_artifact(rows, key=key, description=description))
        remember(paths, key, description)


def publish_markdown(kind: str, paths: RunPaths, markdown: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key(kind, paths.run_id)
    replace_artifact(key, lambda: create_markdown_artifact(markdown, key=key, description=description))
    remember(paths, key, description)


def new_progress_artifact(paths: RunPaths, stage: str) -> Any:
    """The stage's progress card for this pass (replacing an earlier pass's), at 0 %."""
    from prefect.artifacts import create_progress_artifact

    key = artifact_key(f"{stage}-progress", paths.run_id)
    description = f"{stage}: shards done, run {paths.run_id}"
    progress_id = replace_artifact(
        key, lambda: create_progress_artifact(0.0, key=key, description=description)
    )
    remember(paths, key, description)
    return progress_id
