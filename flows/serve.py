"""Serve the factory's deployments from one process: ``python -m flows.serve`` or ``octomed-data serve``.

Deployments: ``factory/factory`` (nightly cron), every stage flow (``ingest/ingest``,
``distill/distill`` ... runnable from the UI with their parameter forms, including ``shards`` to
re-run one shard), and ``train/train`` (the training form). With the recipe's automation on,
a completed ``mixture`` flow run starts ``train/train``. ``deploy/prefect.yaml`` describes the
same deployments for a work pool and worker.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import serve as prefect_serve
from prefect.deployments.runner import RunnerDeployment

from flows.common import RunParams
from flows.decontaminate import decontaminate_flow
from flows.distill import distill_flow
from flows.export import export_flow
from flows.factory import factory_flow
from flows.filter import filter_flow
from flows.ingest import ingest_flow
from flows.mixture import mixture_flow
from flows.training import TrainParams, checkpoint_flow, evaluate_flow, train_flow
from octomed_data.recipe import load_recipe

FACTORY_CRON = "0 2 * * *"  # nightly; keep in step with deploy/prefect.yaml


def deployments(recipe_path: str = "demo", *, schedules: bool = True) -> list[RunnerDeployment]:
    """The factory's deployments, parameters defaulting to ``recipe_path``."""
    run = RunParams(recipe_path=recipe_path).model_dump()
    stage_flows = [
        ingest_flow,
        decontaminate_flow,
        distill_flow,
        filter_flow,
        mixture_flow,
        export_flow,
        checkpoint_flow,
        evaluate_flow,
    ]
    out = [
        factory_flow.to_deployment(
            name="factory",
            cron=FACTORY_CRON if schedules else None,
            parameters={"run": run},
            tags=["octomed"],
            description="The whole factory for the recipe (a new run each time).",
        ),
        train_flow.to_deployment(
            name="train",
            parameters={"params": TrainParams(run=RunParams(recipe_path=recipe_path)).model_dump()},
            tags=["octomed", "training"],
            description="SFT on a run's export; started from the UI form or by the mixture automation.",
        ),
    ]
    for f in stage_flows:
        out.append(f.to_deployment(name=f.name, parameters={"run": run}, tags=["octomed", "stage"]))
    return out


def apply_training_automation(train: RunnerDeployment, enabled: bool) -> Any:
    """Register the training deployment (so it has an id) and create the automation for it."""
    from flows.automation import ensure_training_automation

    deployment_id = train.apply()
    return ensure_training_automation(deployment_id, enabled=enabled)


def serve(recipe_path: str = "demo", *, with_automation: bool = True, schedules: bool = True) -> None:
    """Serve every deployment until interrupted (needs a Prefect API: ``prefect server start``)."""
    recipe = load_recipe(recipe_path)
    deps = deployments(recipe_path, schedules=schedules)
    train = next(d for d in deps if d.name == "train")
    apply_training_automation(train, enabled=with_automation and recipe.automation.train_on_mixture)
    prefect_serve(*deps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--no-automation", action="store_true")
    parser.add_argument("--no-schedules", action="store_true")
    args = parser.parse_args(argv)
    serve(args.recipe, with_automation=not args.no_automation, schedules=not args.no_schedules)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
