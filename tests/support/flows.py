"""Prefect API queries for the flow tests."""

from __future__ import annotations


def artifact_keys(wanted: list[str]) -> set[str]:
    """Which of ``wanted`` artifact keys exist on the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=wanted)), limit=200
        )
        return {a.key for a in found}
