"""docker-compose.yml against the compose specification, cross-references, env file; deploy/prefect.yaml.

No Docker engine here: the file is interpolated the way compose does it (values from
.env.example, dummies for required secrets) and validated against the compose-spec JSON
schema vendored in deploy/compose-spec.json (schema/compose-spec.json of github.com/compose-spec/compose-spec
at a08f8d51631b7127ddac3d2c65537db429d0f1d0: the current specification, which knows secrets taken from an
environment variable; the docker-compose 1.29.2 copy it replaces did not).
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.compose import ROOT, VAR, interpolate, read_env_example

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|API_KEY|ROOT_USER")


def env_example() -> dict[str, str]:
    return read_env_example()


def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    filled = {k: v or f"dummy-{k.lower()}" for k, v in env_example().items()}
    return yaml.safe_load(interpolate(compose_text(), filled))


def test_validates_against_compose_spec(compose):
    schema = json.loads((ROOT / "deploy" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)  # the schema declares draft-07
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def test_required_services(compose):
    services = compose["services"]
    for name in (
        "postgres",
        "prefect-server",
        "prefect-worker",
        "minio",
        "minio-init",
        "ray-head",
        "ray-worker",
        "vllm",
    ):
        assert name in services, name
    assert services["vllm"]["profiles"] == ["gpu"]
    assert "profiles" not in services["prefect-worker"]
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in gpu["capabilities"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    assert "mc mb" in services["minio-init"]["entrypoint"]
    assert "prefect worker start --pool octomed" in services["prefect-worker"]["command"]


def test_cross_references(compose):
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    networks = set(compose.get("networks") or {})
    built_images = {s["image"] for s in services.values() if "build" in s}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source")
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name} uses undeclared volume {source}"
        for net in svc.get("networks") or []:
            assert net in networks, f"{name} uses undeclared network {net}"
        image = svc.get("image", "")
        if image.startswith("octomed-data"):
            assert image in built_images, f"{name} uses {image} that no service builds"
    # every Ray node and client enforces the same token (the dashboard port is published)
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"], name
    # a worker needs its dependencies to come up first
    assert set(services["prefect-worker"]["depends_on"]) >= {"prefect-server", "minio-init"}


def test_env_file_covers_every_variable_and_holds_no_secret():
    example = env_example()
    used = {m.group(1): m.group(2) for m in VAR.finditer(compose_text())}
    missing = sorted(set(used) - set(example))
    assert not missing, f"variables used but not in .env.example: {missing}"
    for name, op in used.items():
        if SECRET_NAME.search(name) and name != "HF_TOKEN":
            assert op == ":?", f"{name} must be required (${{{name}:?must be set}}), not defaulted"
            assert example[name] == "", f".env.example must not ship a value for {name}"
    with pytest.raises(ValueError, match="must be set"):
        interpolate(compose_text(), {})  # an empty env file cannot start the stack


def test_dockerfile_never_pulls_cuda_torch():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert "torchvision" not in text


def test_prefect_yaml_deployments_match_the_flows():
    """Every deployment's entrypoint is a real flow and its parameters validate against it."""
    spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"factory", "train", "distill", "mixture", "evaluate"} <= names
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        flow.validate_parameters(dep.get("parameters") or {})
        assert dep["work_pool"]["name"] == "octomed"
    factory = next(d for d in spec["deployments"] if d["name"] == "factory")
    assert factory["schedules"][0]["cron"]
    # `shards` is how the UI re-runs one failed shard
    distill = next(d for d in spec["deployments"] if d["name"] == "distill")
    assert "shards" in distill["parameters"]["run"]
