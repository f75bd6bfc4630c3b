"""The factory's deployments, defined once.

``DEPLOYMENTS`` names every deployment: flow entrypoint, parameters, schedule, tags, work pool and
queue, concurrency and description. Two things are built from it, so they cannot drift apart:

- ``octomed-data serve`` / ``python -m flows.serve``: :func:`runner_deployments` (served in-process);
- ``deploy/prefect.yaml`` (work pool + worker, the compose stack): :func:`prefect_yaml`, written by
  ``octomed-data deployments --write deploy/prefect.yaml``. ``tests/flows/test_deployments.py`` fails when
  the checked-in file differs from the generated one.

Where the worker finds the project and the recipe is settled when ``prefect deploy`` runs, by two
build steps (plain shell ``echo``):

- ``OCTOMED_HOME``: the project folder the worker enters before loading a flow (its pull step).
  Default: the folder ``prefect deploy`` runs in, i.e. the checkout root (``/app`` in the image,
  whose Dockerfile also sets ``OCTOMED_HOME=/app``).
- ``OCTOMED_RECIPE``: the recipe the deployments run by default (a UI form field, changeable per
  run). Default: ``$OCTOMED_HOME/recipes/factory.yaml`` (the compose stack mounts ``./recipes``
  there); ``OCTOMED_RECIPE=demo`` runs the embedded demo recipe.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any, Literal

import yaml

WORK_POOL = "octomed"
WORK_QUEUE = "default"
FACTORY_CRON = "0 2 * * *"  # nightly
TIMEZONE = "UTC"
HOME_ENV = "OCTOMED_HOME"
RECIPE_ENV = "OCTOMED_RECIPE"
HOME_STEP = "octomed-home"
RECIPE_STEP = "octomed-recipe"
# Deploy-time templates (Prefect fills them from the build steps' output).
HOME_TEMPLATE = "{{ " + HOME_STEP + ".stdout }}"
RECIPE_TEMPLATE = "{{ " + RECIPE_STEP + ".stdout }}"
PREFECT_VERSION = "3.9.1"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment. ``form`` is the flow's single parameter: ``run`` (RunParams), ``params``
    (TrainParams), ``experiment`` (ExperimentParams) or ``rl`` (RLParams; both also named ``params``)."""

    name: str
    entrypoint: str  # "flows/factory.py:factory_flow", relative to the project folder
    description: str
    tags: tuple[str, ...]
    form: Literal["run", "params", "experiment", "rl"] = "run"
    rejudge: bool = False  # the form also has ``verify``: new verifier settings to re-judge a run with
    cron: str | None = None
    concurrency_limit: int | None = None
    work_queue: str = WORK_QUEUE

    @property
    def module(self) -> str:
        return self.entrypoint.split(":")[0].removesuffix(".py").replace("/", ".")

    @property
    def function(self) -> str:
        return self.entrypoint.split(":")[1]

    def load_flow(self) -> Any:
        """The flow object (imports its module)."""
        return getattr(importlib.import_module(self.module), self.function)

    def parameters(self, recipe_path: str) -> dict[str, Any]:
        """The deployment's default parameters, with every field of the form spelled out."""
        from flows.common import RunParams

        run = RunParams(recipe_path=recipe_path)
        if self.form == "experiment":  # the spec names its own recipe
            from flows.experiment import ExperimentParams

            return {"params": ExperimentParams().model_dump(mode="json")}
        if self.form == "params":
            from flows.train import TrainParams

            return {"params": TrainParams(run=run).model_dump(mode="json")}
        if self.form == "rl":
            from flows.rl import RLParams

            return {"params": RLParams(run=run).model_dump(mode="json")}
        out: dict[str, Any] = {"run": run.model_dump(mode="json")}
        if self.rejudge:
            out["verify"] = None  # empty: the run keeps its settings
        return out


STAGE_HELP = "; set run_id (and shards) to work on an existing run."
DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        name="factory",
        entrypoint="flows/factory.py:factory_flow",
        description="The whole factory for the recipe: a new run each night, or now from the UI; "
        "`verify` re-judges an existing run with new verifier settings (no distillation request).",
        tags=("octomed",),
        rejudge=True,
        cron=FACTORY_CRON,
    ),
    DeploymentSpec(
        name="ingest",
        entrypoint="flows/ingest.py:ingest_flow",
        description="Ingest the recipe's sources" + STAGE_HELP,
        tags=("octomed", "stage"),
    ),
    DeploymentSpec(
        name="decontaminate",
        entrypoint="flows/decontaminate.py:decontaminate_flow",
        description="Remove benchmark questions from a run's questions" + STAGE_HELP,
        tags=("octomed", "stage"),
    ),
    DeploymentSpec(
        name="distill",
        entrypoint="flows/distill.py:distill_flow",
        description="Distill one run's shards; set run_id and shards to re-run a failed shard alone.",
        tags=("octomed", "stage"),
    ),
    DeploymentSpec(
        name="filter",
        entrypoint="flows/filter.py:filter_flow",
        description="Rejection statistics and report of a run's samples" + STAGE_HELP + " Fill `verify` "
        "(the recipe's verify: block) to re-judge the run's stored replies with new settings: "
        "no distillation request, journalled judgements reused; run.json records the new settings.",
        tags=("octomed", "stage"),
        rejudge=True,
    ),
    DeploymentSpec(
        name="mixture",
        entrypoint="flows/mixture.py:mixture_flow",
        description="Rebuild a run's mixture (the export flow's completion, not this one's, triggers the train deployment).",
        tags=("octomed", "stage"),
    ),
    DeploymentSpec(
        name="export",
        entrypoint="flows/export.py:export_flow",
        description="Export a run's mixture for LLaMA-Factory and TRL" + STAGE_HELP,
        tags=("octomed", "stage"),
    ),
    DeploymentSpec(
        name="release",
        entrypoint="flows/release.py:release_flow",
        description="Publish a filtered run as a dataset with its card (recipe's release block, or `out`)"
        + STAGE_HELP,
        tags=("octomed", "stage"),
    ),
    DeploymentSpec(
        name="train",
        entrypoint="flows/train.py:train_flow",
        description="SFT on a run's TRL export (UI form), then checkpoint registration and evaluation; "
        "started from the UI or by the automation when an export completes.",
        tags=("octomed", "training"),
        form="params",
    ),
    DeploymentSpec(
        name="rl",
        entrypoint="flows/rl.py:rl_flow",
        description="RL after SFT (GRPO, the factory's verifier as the reward) on a run with a finished "
        "SFT checkpoint, then the RL checkpoint's evaluation and SFT vs SFT+RL; exactly once per "
        "(checkpoint, RL data, settings); started from the UI or by the automation after a train run.",
        tags=("octomed", "training", "rl"),
        form="rl",
    ),
    DeploymentSpec(
        name="experiment",
        entrypoint="flows/experiment.py:experiment_flow",
        description="The recipe lab: an experiment spec's arms (selected from one base run, no teacher "
        "request) trained, evaluated with one protocol and compared; set arms to re-run one alone.",
        tags=("octomed", "training", "lab"),
        form="experiment",
    ),
    DeploymentSpec(
        name="checkpoint",
        entrypoint="flows/train.py:checkpoint_flow",
        description="Register a run's trained checkpoint.",
        tags=("octomed", "training"),
    ),
    DeploymentSpec(
        name="evaluate",
        entrypoint="flows/train.py:evaluate_flow",
        description="Evaluate a run's checkpoint on held-out questions.",
        tags=("octomed", "training"),
    ),
)


def spec(name: str) -> DeploymentSpec:
    """The deployment called ``name``."""
    for d in DEPLOYMENTS:
        if d.name == name:
            return d
    raise KeyError(name)


def runner_deployments(recipe_path: str = "demo", *, schedules: bool = True) -> list[Any]:
    """``RunnerDeployment`` objects for ``prefect.serve``, parameters defaulting to ``recipe_path``."""
    out = []
    for d in DEPLOYMENTS:
        out.append(
            d.load_flow().to_deployment(
                name=d.name,
                cron=d.cron if schedules else None,
                parameters=d.parameters(recipe_path),
                tags=list(d.tags),
                description=d.description,
                concurrency_limit=d.concurrency_limit,
            )
        )
    return out


def prefect_config() -> dict[str, Any]:
    """The content of ``deploy/prefect.yaml`` as data."""
    build = [
        {
            "prefect.deployments.steps.run_shell_script": {
                "id": HOME_STEP,
                "script": f'echo "${{{HOME_ENV}:-$(pwd)}}"',
                "shell": True,
                "stream_output": False,
            }
        },
        {
            "prefect.deployments.steps.run_shell_script": {
                "id": RECIPE_STEP,
                "script": f'echo "${{{RECIPE_ENV}:-${{{HOME_ENV}:-$(pwd)}}/recipes/factory.yaml}}"',
                "shell": True,
                "stream_output": False,
            }
        },
    ]
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": HOME_TEMPLATE}}]
    deployments = []
    for d in DEPLOYMENTS:
        entry: dict[str, Any] = {
            "name": d.name,
            "entrypoint": d.entrypoint,
            "description": d.description,
            "tags": list(d.tags),
            "work_pool": {"name": WORK_POOL, "work_queue_name": d.work_queue},
        }
        if d.concurrency_limit is not None:
            entry["concurrency_limit"] = d.concurrency_limit
        entry["parameters"] = copy.deepcopy(d.parameters(RECIPE_TEMPLATE))
        if d.cron:
            entry["schedules"] = [{"cron": d.cron, "timezone": TIMEZONE, "active": True}]
        deployments.append(entry)
    return {
        "name": "octomed-data",
        "prefect-version": PREFECT_VERSION,
        "build": build,
        "pull": pull,
        "deployments": deployments,
    }


HEADER = """\
# GENERATED from flows/deployments.py by `octomed-data deployments --write deploy/prefect.yaml`;
# do not edit by hand (tests/flows/test_deployments.py fails when this file and the definition differ).
#
# Prefect deployments of the octomed data factory, for a work pool and worker. From the project folder:
#   prefect work-pool create octomed --type process
#   prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml
#   python -m flows.automation            # the export -> train automation
#   prefect worker start --pool octomed
# At deploy time OCTOMED_HOME (default: the folder `prefect deploy` runs in; /app in the image) is
# where the worker runs flows from, and OCTOMED_RECIPE (default: $OCTOMED_HOME/recipes/factory.yaml;
# `demo` for the embedded demo) the recipe the deployments run by default.
# `octomed-data serve` serves the same deployments without a work pool (flows/serve.py).
"""


def prefect_yaml() -> str:
    """The text of ``deploy/prefect.yaml``."""
    body = yaml.safe_dump(prefect_config(), sort_keys=False, default_flow_style=False, width=1000)
    return HEADER + body
