"""One deployment definition (flows/deployments.py): deploy/prefect.yaml is generated from it, and
``serve`` builds its deployments from it. No Prefect server needed: the YAML's build steps run
through Prefect's own step functions and templating, as ``prefect deploy`` runs them (the step
runner itself would start a temporary API server to resolve blocks and variables, none used here)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.importtools import import_object
from prefect.utilities.templating import apply_values

from cli import main
from flows.deployments import DEPLOYMENTS, FACTORY_CRON, prefect_yaml, spec

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deploy" / "prefect.yaml"


def test_checked_in_yaml_is_the_generated_one():
    assert PREFECT_YAML.read_text(encoding="utf-8") == prefect_yaml(), (
        "deploy/prefect.yaml differs from flows/deployments.py; "
        "run: octomed-data deployments --write deploy/prefect.yaml"
    )


def test_deployments_command_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "prefect.yaml"
    assert main(["deployments", "--write", str(out)]) == 0
    assert out.read_text() == PREFECT_YAML.read_text()
    assert main(["deployments", "--check", str(out)]) == 0
    out.write_text(out.read_text().replace("0 2 * * *", "0 3 * * *"))
    capsys.readouterr()
    assert main(["deployments", "--check", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--write" in err[0]
    assert main(["deployments"]) == 0
    assert capsys.readouterr().out == prefect_yaml()


def deploy_time(env: dict[str, str], monkeypatch) -> dict:
    """The YAML as ``prefect deploy`` resolves it in ROOT: build steps run, their outputs applied."""
    monkeypatch.chdir(ROOT)
    for name in ("OCTOMED_HOME", "OCTOMED_RECIPE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = yaml.safe_load(PREFECT_YAML.read_text())
    outputs = {}
    for step in config["build"]:
        ((fqn, inputs),) = step.items()
        inputs = apply_values(dict(inputs), outputs)
        step_id = inputs.pop("id")
        outputs[step_id] = asyncio.run(import_object(fqn)(**inputs))
    return {
        "pull": apply_values(config["pull"], outputs, remove_notset=False),
        "deployments": [
            apply_values(apply_values(d, os.environ, remove_notset=False), outputs)
            for d in config["deployments"]
        ],
    }


@pytest.mark.parametrize(
    "env, home, recipe",
    [
        ({}, str(ROOT), str(ROOT / "recipes" / "factory.yaml")),  # a local checkout
        ({"OCTOMED_HOME": "/app"}, "/app", "/app/recipes/factory.yaml"),  # the image
        ({"OCTOMED_RECIPE": "demo"}, str(ROOT), "demo"),
    ],
)
def test_yaml_resolves_to_the_checkout_or_the_image(env, home, recipe, monkeypatch):
    resolved = deploy_time(env, monkeypatch)
    assert resolved["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": home}}]
    for dep in resolved["deployments"]:
        params = dep["parameters"]
        if dep["name"] == "experiment":  # its spec names the recipe of the base run
            assert params["params"]["spec"] == "sources"
            continue
        run = params["params"]["run"] if "params" in params else params["run"]
        assert run["recipe_path"] == recipe, dep["name"]


def test_every_deployment_loads_and_its_parameters_validate(monkeypatch):
    resolved = deploy_time({}, monkeypatch)
    deps = {d["name"]: d for d in resolved["deployments"]}
    assert list(deps) == [d.name for d in DEPLOYMENTS]
    assert {"factory", "train", "distill", "mixture", "evaluate"} <= set(deps)
    for dep in deps.values():
        flow = load_flow_from_entrypoint(dep["entrypoint"])  # relative to the project folder
        flow.validate_parameters(dep["parameters"])
        assert set(dep["parameters"]) <= set(flow.parameters.properties)
        assert dep["work_pool"] == {"name": "octomed", "work_queue_name": "default"}
        assert dep["description"] and "octomed" in dep["tags"]
    assert deps["factory"]["schedules"] == [{"cron": FACTORY_CRON, "timezone": "UTC", "active": True}]
    assert "shards" in deps["distill"]["parameters"]["run"]  # how the UI re-runs one failed shard
    train = deps["train"]["parameters"]["params"]
    assert {"launcher", "processes", "model_path", "max_steps", "evaluate"} <= set(train)


def test_serve_builds_the_same_deployments(monkeypatch):
    from flows.serve import deployments

    monkeypatch.chdir(ROOT)
    served = {d.name: d for d in deployments("my-recipe.yaml")}
    assert list(served) == [d.name for d in DEPLOYMENTS]
    generated = {d["name"]: d for d in yaml.safe_load(prefect_yaml())["deployments"]}
    for name, dep in served.items():
        want = generated[name]
        assert dep.entrypoint == want["entrypoint"]
        assert dep.tags == want["tags"]
        assert dep.description == want["description"]
        assert dep.parameters == spec(name).parameters("my-recipe.yaml")
        crons = [s.schedule.cron for s in dep.schedules or []]
        assert crons == [s["cron"] for s in want.get("schedules", [])]
    assert served["train"].parameters["params"]["launcher"] is None
    assert not any(d.schedules for d in deployments("demo", schedules=False))


def test_serve_creates_both_automations_and_no_automation_removes_them(prefect_harness, monkeypatch):
    """``serve`` registers export -> train and train -> RL; ``serve --no-automation`` removes both."""
    from prefect.automations import Automation

    from flows.automation import AUTOMATION_NAME, RL_AUTOMATION_NAME
    from flows.serve import apply_automations, deployments

    monkeypatch.chdir(ROOT)
    deps = deployments("demo", schedules=False)
    made = apply_automations(deps, train=True, rl=True)
    assert made["train"].name == AUTOMATION_NAME and made["rl"].name == RL_AUTOMATION_NAME
    rl_action = Automation.read(name=RL_AUTOMATION_NAME).actions[0]
    train_action = Automation.read(name=AUTOMATION_NAME).actions[0]
    assert rl_action.deployment_id == made["rl"].actions[0].deployment_id
    assert rl_action.deployment_id != train_action.deployment_id
    assert apply_automations(deps, train=False, rl=False) == {"train": None, "rl": None}
    for name in (AUTOMATION_NAME, RL_AUTOMATION_NAME):
        try:
            Automation.read(name=name)
        except ValueError:
            continue
        raise AssertionError(f"{name} still exists after --no-automation")


def test_no_entrypoint_folder_module_shadows_an_imported_package():
    """Prefect loads an entrypoint ``flows/x.py:f`` as a script, with ``flows/`` first on ``sys.path``
    (and the file registered as top-level module ``x``): a ``flows/training.py`` then shadowed the
    ``training`` package, and the RL flow run the automation starts failed with ``No module named
    'training.rl_stage'; 'training' is not a package``. No module beside an entrypoint may share its
    name with a top-level name any project file imports."""
    import ast

    folders = {(ROOT / d.entrypoint.split(":")[0]).parent for d in DEPLOYMENTS}
    siblings = {p.stem: p for folder in folders for p in folder.glob("*.py") if p.stem != "__init__"}
    imported: dict[str, str] = {}
    for package in ("octomed_data", "cli", "flows", "tasks", "training", "evaluation"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    imported.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    assert {"training", "octomed_data", "prefect"} <= set(imported)  # the scan reads what it should
    clashes = {
        f"{siblings[n].relative_to(ROOT)} (imported as a package in {imported[n]})"
        for n in siblings
        if n in imported
    }
    assert not clashes, f"rename: {sorted(clashes)}"
