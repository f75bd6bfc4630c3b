"""Release flow: publish a filtered run as a dataset (Parquet rows + dataset card), e.g. to s3://."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import RunParams, prepare, publish_markdown, run_stage_flow
from flows.naming import run_name
from octomed_data.errors import ConfigError
from octomed_data.stages import GLOBAL_SHARD
from octomed_data.stages.release import ReleaseStage


def release_markdown(result: dict[str, Any]) -> str:
    """The ``release-<run_id>`` artifact: where the release is and what it holds."""
    lines = [
        f"# Release of run `{result['run_id']}`",
        "",
        f"**{result['rows']}** question(s), **{result['responses']}** response(s) "
        f"({'all' if result['all_responses'] else 'accepted'}), at `{result['uri']}`; "
        + (
            f"**{result['images']}** image(s) embedded; "
            if result.get("with_images")
            else "images as references only; "
        )
        + f"card `{result['card']}`.",
        "",
        "| source | rows | responses | excluded (benchmark match) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s} | {c.get('rows', 0)} | {c.get('responses', 0)} | {c.get('excluded', 0)} |"
        for s, c in result["per_source"].items()
    ]
    dropped = sum(result["metadata_keys_dropped"].values())
    return "\n".join(lines + ["", f"Patient/DICOM metadata fields removed: {dropped}."])


@flow(name="release", flow_run_name=run_name, log_prints=True)
def release_flow(
    run: RunParams = RunParams(),
    out: str | None = None,
    all_responses: bool | None = None,
    with_images: bool | None = None,
) -> dict[str, Any]:
    """``RUN`` (questions, verdicts, accepted or raw replies, stats) -> ``OUT/data/train-*`` + ``OUT/README.md``.

    ``out`` / ``all_responses`` / ``with_images`` (embed the images' pixels) default to the
    recipe's ``release`` block.
    """
    recipe, paths = prepare(run)
    settings = recipe.release
    target = out or settings.out
    if not target:
        raise ConfigError("release needs an output URI: set release.out in the recipe or the flow's `out`")
    stage = ReleaseStage(
        paths,
        target,
        all_responses=settings.all_responses if all_responses is None else all_responses,
        with_images=with_images,  # None: the recipe's release.with_images (read by release())
        licenses=settings.licenses,
    )
    result = run_stage_flow(stage, run.model_copy(update={"shards": None})).outcomes[GLOBAL_SHARD].counts
    publish_markdown("release", paths, release_markdown(result), f"Release of run {paths.run_id}")
    print(f"release: {result['rows']} question(s) at {result['uri']}")
    return {"run_id": paths.run_id} | result
