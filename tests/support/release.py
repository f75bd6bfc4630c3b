"""The release tests' run: ingest -> decontaminate -> distill (sandbox) -> filter."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from octomed_data.layout import RunPaths
from octomed_data.recipe import load_recipe
from octomed_data.runs import start_run
from octomed_data.sandbox import FaultConfig, start_sandbox
from octomed_data.stages import LocalExecutor, raise_for_failures, run_stage
from octomed_data.stages.decontaminate import DecontaminateStage
from octomed_data.stages.distill import DistillStage
from octomed_data.stages.filter import FilterStage, recipe_judge
from octomed_data.stages.ingest import IngestStage
from tests.support.reflect import reflecting_teacher

SAMPLES = 4


def build_run(
    store: Path,
    entries: list[dict],
    *,
    decontam: bool,
    demo_sources: bool = True,
    verify: dict | None = None,
    faults: dict | None = None,
    reflected: list[str] | None = None,
) -> RunPaths:
    """ingest -> decontaminate -> distill (sandbox) -> filter (the sandbox judges too when the
    verify settings name a judge), with the library's stages. ``reflected``: distill through a
    teacher that writes its key back into every other question's replies (:mod:`tests.support.reflect`);
    the reflected questions are added to it, one per reflected sample."""
    overrides = {
        "store": str(store),
        "distill": {"samples": SAMPLES},
        "decontam": {"enabled": decontam},
        "sources": entries,
    }
    if verify is not None:
        overrides["verify"] = verify
    if not demo_sources:
        overrides["sources_file"] = None
    recipe = load_recipe("demo", overrides=overrides)
    paths = start_run(recipe, "rel")
    for stage in (
        IngestStage.for_run(paths, recipe.ingest_entries(), recipe.shard_size),
        DecontaminateStage.for_run(paths, recipe.decontam),
    ):
        raise_for_failures(run_stage(stage, LocalExecutor()))
    with start_sandbox(faults=FaultConfig(**(faults or {}))) as sb:
        teacher = reflecting_teacher(sb.base_url) if reflected is not None else nullcontext((sb.base_url, []))
        with teacher as (url, echoed):
            raise_for_failures(run_stage(DistillStage(paths, recipe.distill_config(sandbox_url=url))))
        if reflected is not None:
            reflected += echoed
        judge = recipe_judge(recipe, sandbox_url=sb.base_url)
        raise_for_failures(run_stage(FilterStage.for_recipe(paths, recipe, judge)))
    return paths
