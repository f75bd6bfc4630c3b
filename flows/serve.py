"""Serve the factory's deployments from one process: ``octomed-data serve`` (or ``python -m flows.serve``).

The deployments are defined once, in :mod:`flows.deployments`: ``factory/factory`` (nightly cron),
every stage flow (``ingest/ingest``, ``distill/distill`` ... runnable from the UI with their
parameter forms, including ``shards`` to re-run one shard), and ``train/train`` (the training
form). With the recipe's automation on, a completed ``export`` flow run starts ``train/train``, and a
completed ``train`` flow run starts ``rl/rl`` (which trains only where the run's recipe says
``rl.enabled``); with ``--no-automation`` both automations are removed and the factory trains by itself.
``deploy/prefect.yaml`` is generated from the same definition for a work pool and worker.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import serve as prefect_serve
from prefect.deployments.runner import RunnerDeployment

from flows.deployments import FACTORY_CRON, runner_deployments
from octomed_data.recipe import load_recipe

__all__ = ["FACTORY_CRON", "apply_automations", "apply_training_automation", "deployments", "serve"]


def deployments(recipe_path: str = "demo", *, schedules: bool = True) -> list[RunnerDeployment]:
    """The factory's deployments, parameters defaulting to ``recipe_path``."""
    return runner_deployments(recipe_path, schedules=schedules)


def apply_training_automation(train: RunnerDeployment, enabled: bool) -> Any:
    """Register the training deployment (so it has an id) and create the automation for it."""
    from flows.automation import ensure_training_automation

    deployment_id = train.apply()
    return ensure_training_automation(deployment_id, enabled=enabled)


def apply_automations(deps: list[RunnerDeployment], *, train: bool, rl: bool) -> dict[str, Any]:
    """Register the ``train`` and ``rl`` deployments and create (or remove) their automations:
    export -> train where ``train`` is true, train -> RL where ``rl`` is true. The RL flow started by
    the automation trains only where the run's own recipe says ``rl.enabled`` (the automation cannot
    read a run's recipe), so it is on whenever automations are."""
    from flows.automation import ensure_rl_automation

    by_name = {d.name: d for d in deps}
    return {
        "train": apply_training_automation(by_name["train"], enabled=train),
        "rl": ensure_rl_automation(by_name["rl"].apply(), enabled=rl),
    }


def serve(recipe_path: str = "demo", *, with_automation: bool = True, schedules: bool = True) -> None:
    """Serve every deployment until interrupted (needs a Prefect API: ``prefect server start``)."""
    recipe = load_recipe(recipe_path)
    deps = deployments(recipe_path, schedules=schedules)
    apply_automations(deps, train=with_automation and recipe.automation.train_on_mixture, rl=with_automation)
    prefect_serve(*deps)


if __name__ == "__main__":
    # The same parser as ``octomed-data serve`` (argparse lives in cli/).
    from cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
