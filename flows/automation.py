"""The automation that starts training when a mixture is ready.

An ``EventTrigger`` on ``prefect.flow-run.Completed`` for flow runs of the ``mixture`` flow, with a
``RunDeployment`` action on the ``train`` deployment. The triggering run's ``run`` parameter
(run id, store) is templated into the training run, so it trains on exactly that mixture.
"""

from __future__ import annotations

from uuid import UUID

from prefect.automations import Automation, EventTrigger, Posture, RunDeployment

from flows.mixture import MIXTURE_FLOW_NAME

AUTOMATION_NAME = "octomed-train-on-mixture"


def training_automation(
    train_deployment_id: UUID, *, mixture_flow_name: str = MIXTURE_FLOW_NAME, name: str = AUTOMATION_NAME
) -> Automation:
    """The automation object (not yet created on the server)."""
    return Automation(
        name=name,
        description="Start the training deployment when a mixture flow run completes.",
        enabled=True,
        trigger=EventTrigger(
            expect={"prefect.flow-run.Completed"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": mixture_flow_name},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=train_deployment_id,
                # Rendered by the server from the completed mixture run: same run id and store.
                parameters={"params": {"run": "{{ flow_run.parameters.run }}"}},
            )
        ],
    )


def ensure_training_automation(
    train_deployment_id: UUID, *, enabled: bool = True, mixture_flow_name: str = MIXTURE_FLOW_NAME
) -> Automation | None:
    """Create (or replace) the automation; with ``enabled=False`` remove it. Idempotent by name."""
    while True:  # names are not unique server-side: clear every earlier copy
        try:
            Automation.read(name=AUTOMATION_NAME).delete()
        except ValueError:
            break
    if not enabled:
        return None
    return training_automation(train_deployment_id, mixture_flow_name=mixture_flow_name).create()


def ensure_automation_for(deployment_name: str = "train/train", *, enabled: bool = True) -> Automation | None:
    """Create (or remove) the automation for the deployment ``FLOW/DEPLOYMENT`` (after ``prefect deploy``)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
    return ensure_training_automation(deployment.id, enabled=enabled)


if __name__ == "__main__":
    # ``python -m flows.automation [--deployment train/train] [--disable]`` is
    # ``octomed-data automation ...`` (argparse lives in octomed_data/cli/).
    import sys

    from octomed_data.cli import main

    sys.exit(main(["automation", *sys.argv[1:]]))
