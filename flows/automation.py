"""The automation that starts training when a run's export is committed.

An ``EventTrigger`` on ``prefect.flow-run.Completed`` for flow runs of the ``export`` flow (the TRL
export training reads is committed when that flow completes: firing on the mixture raced the
export), with a ``RunDeployment`` action on the ``train`` deployment. The triggering run's ``run``
parameter (run id, store) is templated into the training run, so it trains on exactly that export.
Training itself is idempotent per (run, export) (:func:`flows.train.train_flow`), so a second
trigger for the same export is a no-op.

A second automation (:func:`rl_automation`, ``octomed-rl-after-train``) starts the ``rl``
deployment when a ``train`` flow run completes, with ``only_if_enabled``: the RL flow runs only
when the run's recipe says ``rl.enabled`` (the automation cannot read the recipe; the flow does),
and trains exactly once per (SFT checkpoint, RL data, settings) however often it fires.
"""

from __future__ import annotations

from uuid import UUID

from prefect.automations import Automation, EventTrigger, Posture, RunDeployment

from flows.export import EXPORT_FLOW_NAME

AUTOMATION_NAME = "octomed-train-on-export"
OLD_AUTOMATION_NAMES = ("octomed-train-on-mixture",)  # removed when the automation is (re)created
RL_AUTOMATION_NAME = "octomed-rl-after-train"
TRAIN_FLOW_NAME = "train"
RL_DEPLOYMENT = "rl/rl"


def training_automation(
    train_deployment_id: UUID, *, export_flow_name: str = EXPORT_FLOW_NAME, name: str = AUTOMATION_NAME
) -> Automation:
    """The automation object (not yet created on the server)."""
    return Automation(
        name=name,
        description="Start the training deployment when an export flow run completes (its export is committed).",
        enabled=True,
        trigger=EventTrigger(
            expect={"prefect.flow-run.Completed"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": export_flow_name},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=train_deployment_id,
                # Rendered by the server from the completed export run: same run id and store.
                parameters={"params": {"run": "{{ flow_run.parameters.run }}"}},
            )
        ],
    )


def ensure_training_automation(
    train_deployment_id: UUID, *, enabled: bool = True, export_flow_name: str = EXPORT_FLOW_NAME
) -> Automation | None:
    """Create (or replace) the automation; with ``enabled=False`` remove it. Idempotent by name."""
    for name in (AUTOMATION_NAME, *OLD_AUTOMATION_NAMES):
        while True:  # names are not unique server-side: clear every earlier copy
            try:
                Automation.read(name=name).delete()
            except ValueError:
                break
    if not enabled:
        return None
    return training_automation(train_deployment_id, export_flow_name=export_flow_name).create()


def automation_active() -> bool:
    """Whether the training automation exists (enabled) on the API server this process talks to.

    The factory leaves training to it only then; with ``serve --no-automation`` (or no server
    automation at all) the factory trains itself.
    """
    try:
        return bool(Automation.read(name=AUTOMATION_NAME).enabled)
    except Exception:  # not found (ValueError), or no API to ask: nobody else will train
        return False


def rl_automation(
    rl_deployment_id: UUID, *, train_flow_name: str = TRAIN_FLOW_NAME, name: str = RL_AUTOMATION_NAME
) -> Automation:
    """RL after SFT: a completed ``train`` flow run starts the ``rl`` deployment on the same run
    (its ``params.run``), which trains only when the run's recipe says ``rl.enabled``."""
    return Automation(
        name=name,
        description="Start the RL deployment when a train flow run completes (runs only where the "
        "run's recipe says rl.enabled).",
        enabled=True,
        trigger=EventTrigger(
            expect={"prefect.flow-run.Completed"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": train_flow_name},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=rl_deployment_id,
                parameters={
                    "params": {"run": "{{ flow_run.parameters.params.run }}", "only_if_enabled": True}
                },
            )
        ],
    )


def ensure_rl_automation(rl_deployment_id: UUID, *, enabled: bool = True) -> Automation | None:
    """Create (or replace) the RL automation; with ``enabled=False`` remove it. Idempotent by name."""
    while True:
        try:
            Automation.read(name=RL_AUTOMATION_NAME).delete()
        except ValueError:
            break
    return rl_automation(rl_deployment_id).create() if enabled else None


def ensure_automation_for(deployment_name: str = "train/train", *, enabled: bool = True) -> Automation | None:
    """Create (or remove) the automation for the deployment ``FLOW/DEPLOYMENT`` (after ``prefect deploy``):
    ``rl/rl`` gets the RL-after-train automation, any other the export -> train one."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
    if deployment_name == RL_DEPLOYMENT:
        return ensure_rl_automation(deployment.id, enabled=enabled)
    return ensure_training_automation(deployment.id, enabled=enabled)


if __name__ == "__main__":
    # ``python -m flows.automation [--deployment train/train] [--disable]`` is
    # ``octomed-data automation ...`` (argparse lives in cli/).
    import sys

    from cli import main

    sys.exit(main(["automation", *sys.argv[1:]]))
