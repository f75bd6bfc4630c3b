"""The compose stack's security properties, on the file as compose renders it (issue 25).

Each property is a function that lists offenders; each test runs it on the real file (no
offender) and on a mutated copy that reintroduces the old weakness (the offender is named), so no
check can pass vacuously. The scripts that handle keys (the factory image's entrypoint, minio,
minio-init and vLLM's entrypoints) are run for real with ``sh``, stand-in programs in place of
mc / vllm / minio that record their argument vectors, and secret files in a temporary folder.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

# Who may see what.
TEACHER_CALLERS = {"prefect-worker", "ray-head", "ray-worker", "vllm"}
MINIO_ROOT_HOLDERS = {"minio", "minio-init"}
FACTORY_S3_USERS = {"prefect-worker", "ray-head", "ray-worker"}
# Variables whose values are keys: they travel as compose secrets only.
SECRET_VARIABLES = (
    "TEACHER_API_KEY",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "OCTOMED_S3_SECRET_KEY",
    "HF_TOKEN",
)
# The one root container and the only capability it keeps.
ROOT_ONESHOT = "volume-init"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


# --- the properties -----------------------------------------------------------------------------


def published_beyond_loopback(compose: dict[str, Any]) -> list[str]:
    """``service port`` for every port published on more than the loopback interface."""
    bad = []
    for name, svc in compose["services"].items():
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                host_ip = port.get("host_ip", "")
            else:
                parts = str(port).rsplit(":", 2)
                host_ip = parts[0] if len(parts) == 3 else ""
            try:
                loopback = ipaddress.ip_address(host_ip.strip("[]")).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                bad.append(f"{name} {port}")
    return bad


def root_services(compose: dict[str, Any]) -> list[str]:
    """Services that run as root (no ``user:``, or uid 0 / root), the declared one-shot aside,
    and that one-shot too if it holds more than CAP_CHOWN, a network, a secret or a port."""
    bad = []
    for name, svc in compose["services"].items():
        user = str(svc.get("user", "")).split(":")[0].strip()
        is_root = user in ("", "0", "root")
        if name == ROOT_ONESHOT:
            confined = (
                svc.get("cap_drop") == ["ALL"]
                and svc.get("cap_add") == ["CHOWN"]
                and svc.get("network_mode") == "none"
                and not svc.get("secrets")
                and not svc.get("environment")
                and not svc.get("ports")
            )
            if not confined:
                bad.append(f"{name}: root one-shot must keep only CAP_CHOWN, no network, no secret")
        elif is_root:
            bad.append(f"{name}: user {svc.get('user')!r}")
    return bad


def dockerfile_user(text: str) -> str:
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    return users[-1] if users else ""


def command_lines(svc: dict[str, Any]) -> list[str]:
    out = []
    for key in ("command", "entrypoint"):
        value = svc.get(key)
        if value:
            out.append(value if isinstance(value, str) else " ".join(map(str, value)))
    health = (svc.get("healthcheck") or {}).get("test")
    if health:
        out.append(health if isinstance(health, str) else " ".join(map(str, health)))
    return out


def keys_on_command_lines(compose: dict[str, Any], secret_values: dict[str, str]) -> list[str]:
    """A key's value, an ``--api-key`` flag, or a shell expansion of a key variable, in a command,
    entrypoint or healthcheck (all of which `docker inspect` and `ps` show)."""
    key_vars = set(SECRET_VARIABLES) | {"OPENAI_API_KEY", "VLLM_API_KEY", "AWS_SECRET_ACCESS_KEY"}
    expansion = re.compile(r"\$\{?(" + "|".join(sorted(key_vars)) + r")\b")
    bad = []
    for name, svc in compose["services"].items():
        for line in command_lines(svc):
            bad += [f"{name}: value of {var}" for var, value in secret_values.items() if value in line]
            if "--api-key" in line:
                bad.append(f"{name}: --api-key")
            bad += [f"{name}: expands ${m}" for m in expansion.findall(line)]
    return bad


def key_values_anywhere(compose: dict[str, Any], secret_values: dict[str, str]) -> list[str]:
    """A key's value anywhere in a service (environment, labels, ...): keys travel as secrets only."""
    bad = []
    for name, svc in compose["services"].items():
        text = json.dumps(svc)
        bad += [f"{name}: value of {var}" for var, value in secret_values.items() if value in text]
    return bad


def secret_holders(compose: dict[str, Any], variable: str) -> set[str]:
    """Services that mount a secret taken from ``variable``."""
    sources = {n for n, s in (compose.get("secrets") or {}).items() if s.get("environment") == variable}
    holders = set()
    for name, svc in compose["services"].items():
        for entry in svc.get("secrets") or []:
            if (entry if isinstance(entry, str) else entry["source"]) in sources:
                holders.add(name)
    return holders


def services_without_limits(compose: dict[str, Any]) -> list[str]:
    bad = []
    for name, svc in compose["services"].items():
        limits = ((svc.get("deploy") or {}).get("resources") or {}).get("limits") or {}
        cpus = limits.get("cpus", svc.get("cpus"))
        memory = limits.get("memory", svc.get("mem_limit"))
        try:
            ok = float(cpus) > 0 and re.fullmatch(r"[1-9][0-9]*(\.[0-9]+)?[bkmg]?", str(memory).lower())
        except (TypeError, ValueError):
            ok = False
        if not ok:
            bad.append(f"{name}: cpus={cpus!r} memory={memory!r}")
    return bad


def dockerfile_froms(root: Path, dockerfile: str) -> list[str]:
    """The base images a Dockerfile builds from (every stage's ``FROM``)."""
    return re.findall(r"^FROM\s+(\S+)", (root / dockerfile).read_text(), flags=re.M)


def unpinned_images(compose: dict[str, Any], root: Path) -> list[str]:
    """``service: image`` for every image not pinned by digest: a pulled image without
    ``@sha256:``, or an image built here from a Dockerfile with an unpinned ``FROM``."""
    built = {s["image"]: s["build"] for s in compose["services"].values() if "build" in s}
    bad = []
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        if image in built:
            build = built[image]
            dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
            froms = dockerfile_froms(root, dockerfile)
            if froms and all(DIGEST.search(f) for f in froms):
                continue
            bad.append(f"{name}: {image} (FROM {', '.join(froms) or 'nothing'})")
        elif not DIGEST.search(image):
            bad.append(f"{name}: {image}")
    return bad


def minio_init_script(compose: dict[str, Any]) -> str:
    argv = shlex.split(compose["services"]["minio-init"]["entrypoint"])
    assert argv[:2] == ["/bin/sh", "-ec"] and len(argv) == 3, argv[:2]
    return argv[2]


def bucket_policy(script: str, bucket: str) -> dict[str, Any]:
    body = re.search(r"<<EOF\n(.*?)\nEOF\n", script, flags=re.S)
    assert body, "minio-init writes no policy document"
    return json.loads(body.group(1).replace("${OCTOMED_BUCKET}", bucket))


def policy_beyond_bucket(policy: dict[str, Any], bucket: str) -> list[str]:
    """Statements that allow more than object and listing actions on that one bucket."""
    allowed = {
        "s3:GetBucketLocation",
        "s3:ListBucket",
        "s3:ListBucketMultipartUploads",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    }
    bad = []
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        bad += [f"action {a}" for a in actions if a not in allowed]
        bad += [
            f"resource {r}"
            for r in resources
            if r not in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*")
        ]
        if st.get("Effect") != "Allow" or "NotResource" in st or "NotAction" in st:
            bad.append(f"statement {st}")
    return bad


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose(render) -> dict[str, Any]:
    return render()


@pytest.fixture(scope="module")
def secret_values(filled_env) -> dict[str, str]:
    return {var: filled_env[var] for var in SECRET_VARIABLES}


def mutated(text: str, old: str, new: str) -> str:
    assert old in text, f"mutation anchor not found: {old!r}"
    return text.replace(old, new, 1)


# --- published ports ----------------------------------------------------------------------------


def test_ui_console_and_dashboard_are_published_on_loopback_only(compose, render, compose_text):
    published = {name for name, svc in compose["services"].items() if svc.get("ports")}
    assert published == {"prefect-server", "minio", "ray-head"}
    assert published_beyond_loopback(compose) == []
    # an empty OCTOMED_PUBLISH_ADDRESS falls back to loopback, not to every interface
    assert published_beyond_loopback(render(OCTOMED_PUBLISH_ADDRESS="")) == []
    # widening is deliberate: one variable, and the check sees it
    wide = published_beyond_loopback(render(OCTOMED_PUBLISH_ADDRESS="0.0.0.0"))
    assert sorted(w.split()[0] for w in wide) == ["minio", "prefect-server", "ray-head"]
    # the old file: the console on every interface
    old = mutated(
        compose_text, '"${OCTOMED_PUBLISH_ADDRESS:-127.0.0.1}:${MINIO_CONSOLE_PORT', '"${MINIO_CONSOLE_PORT'
    )
    assert published_beyond_loopback(render(old)) == ["minio 9001:9001"]
    assert published_beyond_loopback({"services": {"db": {"ports": [{"target": 5432, "published": 5432}]}}})


# --- users --------------------------------------------------------------------------------------


def test_no_service_runs_as_root(compose, render, compose_text, deploy_root):
    assert root_services(compose) == []
    dockerfile = (deploy_root / "deploy" / "Dockerfile").read_text()
    user = dockerfile_user(dockerfile)
    assert user and user.split(":")[0] not in ("0", "root"), user
    # the image's user is the one the compose file names for the factory's services
    for name, svc in compose["services"].items():
        if svc.get("image") == "octomed-data:latest" and name != ROOT_ONESHOT:
            assert svc["user"] == user, name
    # mutations: a service without `user:`, one as uid 0, a root one-shot that keeps a network
    assert root_services(render(mutated(compose_text, '    user: "70:70"\n', ""))) == ["postgres: user None"]
    assert root_services(render(mutated(compose_text, 'user: "10003:10003"', 'user: "0:0"'))) == [
        "vllm: user '0:0'"
    ]
    assert root_services(render(mutated(compose_text, "    network_mode: none\n", "")))
    assert dockerfile_user(re.sub(r"^USER .*$", "", dockerfile, flags=re.M)) == ""


# --- keys ---------------------------------------------------------------------------------------


def test_no_key_on_any_command_line(compose, render, compose_text, secret_values):
    assert keys_on_command_lines(compose, secret_values) == []
    # the old vLLM command line
    old = mutated(
        compose_text,
        "      - deepseek_r1\n",
        '      - deepseek_r1\n      - --api-key\n      - "${TEACHER_API_KEY:?must be set}"\n',
    )
    assert keys_on_command_lines(render(old), secret_values) == [
        "vllm: value of TEACHER_API_KEY",
        "vllm: --api-key",
    ]
    # the old minio-init: root credentials expanded into mc's arguments
    old = mutated(
        compose_text,
        "mc mb --ignore-existing",
        "mc alias set root http://minio:9000 $${MINIO_ROOT_USER} $${MINIO_ROOT_PASSWORD}\n      mc mb --ignore-existing",
    )
    assert keys_on_command_lines(render(old), secret_values) == [
        "minio-init: expands $MINIO_ROOT_USER",
        "minio-init: expands $MINIO_ROOT_PASSWORD",
    ]


def test_keys_travel_as_secrets_only(compose, render, compose_text, secret_values, env_example):
    assert key_values_anywhere(compose, secret_values) == []
    for var in SECRET_VARIABLES:
        assert var in env_example and env_example[var] == "", f".env.example must not ship a value for {var}"
    declared = {s["environment"] for s in compose["secrets"].values()}
    assert declared == set(SECRET_VARIABLES)
    # the old shared environment handed the teacher key to every factory container
    old = mutated(
        compose_text,
        "  OCTOMED_TEACHER_MODEL: ${OCTOMED_TEACHER_MODEL:-}\n",
        "  OCTOMED_TEACHER_MODEL: ${OCTOMED_TEACHER_MODEL:-}\n  OPENAI_API_KEY: ${TEACHER_API_KEY:?must be set}\n",
    )
    assert sorted(key_values_anywhere(render(old), secret_values)) == [
        "prefect-worker: value of TEACHER_API_KEY",
        "ray-head: value of TEACHER_API_KEY",
        "ray-worker: value of TEACHER_API_KEY",
    ]


def test_teacher_key_only_in_services_that_call_or_serve_the_teacher(compose, render, compose_text):
    assert secret_holders(compose, "TEACHER_API_KEY") == TEACHER_CALLERS
    workers = compose["services"]["prefect-worker"]["secrets"]
    assert {"source": "teacher_api_key", "target": "OPENAI_API_KEY"} in workers
    old = mutated(
        compose_text,
        "    environment: *prefect-client-env\n",
        "    environment: *prefect-client-env\n    secrets: *factory-secrets\n",
    )
    assert secret_holders(render(old), "TEACHER_API_KEY") - TEACHER_CALLERS == {"prefect-deploy"}


def test_minio_root_only_in_minio_and_its_init_the_factory_has_its_own_user(
    compose, render, compose_text, filled_env
):
    for var in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert secret_holders(compose, var) == MINIO_ROOT_HOLDERS, var
    assert secret_holders(compose, "OCTOMED_S3_SECRET_KEY") == FACTORY_S3_USERS | {"minio-init"}
    for name in FACTORY_S3_USERS:
        env = compose["services"][name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == filled_env["OCTOMED_S3_ACCESS_KEY"], name
        assert {"source": "factory_s3_secret_key", "target": "AWS_SECRET_ACCESS_KEY"} in compose["services"][
            name
        ]["secrets"]
    # the old file: the factory as MinIO root
    old = mutated(
        compose_text,
        "  AWS_ACCESS_KEY_ID: ${OCTOMED_S3_ACCESS_KEY:?must be set}",
        "  AWS_ACCESS_KEY_ID: ${MINIO_ROOT_USER:?must be set}",
    )
    assert (
        compose["services"]["prefect-worker"]["environment"]["AWS_ACCESS_KEY_ID"]
        != filled_env["MINIO_ROOT_USER"]
    )
    assert (
        render(old)["services"]["prefect-worker"]["environment"]["AWS_ACCESS_KEY_ID"]
        == filled_env["MINIO_ROOT_USER"]
    )
    old = mutated(
        compose_text,
        "secrets: [minio_root_user, minio_root_password, factory_s3_secret_key]",
        "secrets: [factory_s3_secret_key]",
    )
    old = mutated(old, "    secrets: *factory-secrets\n", "    secrets: [minio_root_user]\n")
    assert secret_holders(render(old), "MINIO_ROOT_USER") == {"minio", "prefect-worker"}


def test_factory_policy_is_limited_to_its_bucket(compose):
    script = minio_init_script(compose)
    policy = bucket_policy(script, "factory-bucket")
    assert policy_beyond_bucket(policy, "factory-bucket") == []
    assert "mc admin policy attach root octomed-factory --user" in script
    wide = json.loads(json.dumps(policy).replace("arn:aws:s3:::factory-bucket/*", "arn:aws:s3:::*"))
    assert policy_beyond_bucket(wide, "factory-bucket") == ["resource arn:aws:s3:::*"]
    admin = json.loads(json.dumps(policy).replace('"s3:DeleteObject"', '"s3:*"'))
    assert policy_beyond_bucket(admin, "factory-bucket") == ["action s3:*"]


# --- limits and images ----------------------------------------------------------------------------


def test_every_service_has_cpu_and_memory_limits(compose, render, compose_text):
    assert services_without_limits(compose) == []
    old = mutated(compose_text, '        limits: {cpus: "0.5", memory: 256m}\n', "")
    assert services_without_limits(render(old)) == ["minio-init: cpus=None memory=None"]
    assert services_without_limits(render(PREFECT_WORKER_MEMORY="lots")) == [
        "prefect-worker: cpus='4' memory='lots'"
    ]


def test_images_are_pinned_by_digest(compose, render, compose_text, deploy_root, tmp_path):
    assert unpinned_images(compose, deploy_root) == []
    built = sorted({s["build"]["dockerfile"] for s in compose["services"].values() if "build" in s})
    assert built == ["deploy/Dockerfile", "deploy/vllm.Dockerfile"]
    old = re.sub(r"(minio/mc:RELEASE[^@]*)@sha256:[0-9a-f]{64}", r"\1", compose_text)
    assert unpinned_images(render(old), deploy_root) == ["minio-init: minio/mc:RELEASE.2025-04-16T18-13-26Z"]
    # A built image is pinned only through its Dockerfile's FROM: a tag-only base is named.
    (tmp_path / "deploy").mkdir()
    for dockerfile in built:
        text = (deploy_root / dockerfile).read_text()
        (tmp_path / dockerfile).write_text(re.sub(r"@sha256:[0-9a-f]{64}", "", text))
    factory = [n for n, s in compose["services"].items() if s.get("image") == "octomed-data:latest"]
    assert "prefect-server" in factory
    assert sorted(unpinned_images(compose, tmp_path)) == sorted(
        ["vllm: octomed-vllm:0.33.0 (FROM python:3.11-slim)"]
        + [f"{name}: octomed-data:latest (FROM python:3.11-slim)" for name in factory]
    )


def test_the_factory_image_holds_every_package_the_project_installs(deploy_root):
    """The image installs the project from the folders it copies: each package pyproject.toml
    includes must be copied (the command line moved to ``cli/`` once and the image lost it)."""
    import tomllib

    project = tomllib.loads((deploy_root / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(
        re.findall(r"^COPY\s+(\S+)\s+\./", (deploy_root / "deploy" / "Dockerfile").read_text(), flags=re.M)
    )
    assert packages and packages <= copied, sorted(packages - copied)
    script = project["project"]["scripts"]["octomed-data"].split(":")[0]
    assert script in copied


def test_vllm_image_matches_the_version_the_readme_documents(compose, deploy_root):
    readme = (deploy_root / "README.md").read_text()
    documented = set(re.findall(r"\bvllm[ -](\d+\.\d+\.\d+)\b", readme))
    tag = compose["services"]["vllm"]["image"].split("@")[0].rsplit(":", 1)[1]
    assert documented == {tag.removeprefix("v")}, (documented, tag)


# --- the scripts that handle keys, run ------------------------------------------------------------


def fake_program(folder: Path, name: str, body: str = "") -> Path:
    """A stand-in for ``name`` that appends its argv (one JSON line) to ``$FAKE_LOG`` and its
    environment to ``$FAKE_LOG.env``, copies its stdin to ``$FAKE_LOG.stdin``, then runs ``body``."""
    path = folder / name
    path.write_text(
        "#!/bin/sh\n"
        f"{shlex.quote(shutil.which('python3') or 'python3')} -c 'import json,sys; print(json.dumps(sys.argv[2:]))' "
        f'{shlex.quote(name)} "$@" >> "$FAKE_LOG"\n'
        'env >> "$FAKE_LOG.env"\n'
        '[ -t 0 ] || cat >> "$FAKE_LOG.stdin"\n' + body
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def run_script(script: str, args: list[str], tmp_path: Path, secrets: dict[str, str], env: dict[str, str]):
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir(exist_ok=True)
    for name, value in secrets.items():
        (secret_dir / name).write_text(value)
    log = tmp_path / "argv.log"
    full_env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "FAKE_LOG": str(log),
        "TMPDIR": str(tmp_path),
        **env,
    }
    script = script.replace("/tmp/", f"{tmp_path}/").replace("/run/secrets", str(secret_dir))
    script = script.replace("/usr/bin/docker-entrypoint.sh", str(tmp_path / "bin" / "docker-entrypoint.sh"))
    script_file = tmp_path / "script.sh"
    script_file.write_text(script + "\n")
    # The script and its arguments go through the environment, so that the command line is only
    # `sh` (the fast tier's guard reads command lines for the names of real components).
    full_env.update(FAKE_SCRIPT=str(script_file), FAKE_ARGS=shlex.join(args))
    proc = subprocess.run(
        ["sh", "-ec", 'eval "set -- $FAKE_ARGS"; . "$FAKE_SCRIPT"'],
        env=full_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    argvs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, argvs, log


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    return folder


def test_factory_entrypoint_exports_secret_files_and_refuses_an_empty_one(deploy_root, tmp_path, fake_bin):
    dockerfile = (deploy_root / "deploy" / "Dockerfile").read_text()
    body = re.search(r"<<'EOF' /usr/local/bin/octomed-entrypoint\n(.*?)\nEOF\n", dockerfile, flags=re.S)
    assert body and 'ENTRYPOINT ["/usr/local/bin/octomed-entrypoint"]' in dockerfile
    script = tmp_path / "entrypoint"
    script.write_text(body.group(1) + "\n")
    fake_program(fake_bin, "prefect")
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    (secrets / "OPENAI_API_KEY").write_text("sk-teacher")
    (secrets / "AWS_SECRET_ACCESS_KEY").write_text("s3-secret")
    (secrets / "not-a-name").write_text("ignored")
    env = {
        "PATH": f"{fake_bin}:/usr/bin:/bin",
        "FAKE_LOG": str(tmp_path / "log"),
        "OCTOMED_SECRETS_DIR": str(secrets),
    }
    proc = subprocess.run(
        ["sh", str(script), "prefect", "worker", "start"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "log").read_text().strip() == '["worker", "start"]'  # exec'd with its arguments
    seen = (tmp_path / "log.env").read_text().splitlines()
    assert "OPENAI_API_KEY=sk-teacher" in seen and "AWS_SECRET_ACCESS_KEY=s3-secret" in seen
    assert not any(line.startswith("not-a-name") for line in seen)
    (secrets / "OPENAI_API_KEY").write_text("")
    proc = subprocess.run(
        ["sh", str(script), "prefect"], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    assert proc.returncode == 64 and "OPENAI_API_KEY is empty" in proc.stderr


def test_minio_init_creates_bucket_policy_and_user_without_keys_in_argv(compose, tmp_path, fake_bin):
    fake_program(
        fake_bin, "mc", 'case "$1 $2 $3" in "admin user info") echo "PolicyName: octomed-factory" ;; esac\n'
    )
    script = minio_init_script(compose)
    secrets = {
        "minio_root_user": "rootuser",
        "minio_root_password": "rootpass-123",
        "factory_s3_secret_key": "factory-secret-9",
    }
    env = {"OCTOMED_BUCKET": "factory-bucket", "OCTOMED_S3_ACCESS_KEY": "factory"}
    proc, argvs, log = run_script(script, [], tmp_path, secrets, env)
    assert proc.returncode == 0, proc.stderr
    calls = [" ".join(a[:3]) for a in argvs]
    assert calls == ["mb --ignore-existing root/factory-bucket", "admin policy create", "admin user add",
                     "admin policy attach", "admin user info"]  # fmt: skip
    flat = json.dumps(argvs)
    assert not any(v in flat for v in secrets.values()), argvs
    assert "factory-secret-9" in Path(f"{log}.stdin").read_text()  # the user's secret came on stdin
    assert "MC_HOST_root=http://rootuser:rootpass-123@minio:9000" in Path(f"{log}.env").read_text()
    policy = json.loads(Path(argvs[1][5]).read_text())
    assert policy_beyond_bucket(policy, "factory-bucket") == []
    # an empty root password stops it before mc runs; so does a factory user that is root
    for bad_secrets, bad_env in (
        ({**secrets, "minio_root_password": ""}, env),
        (secrets, {**env, "OCTOMED_S3_ACCESS_KEY": "rootuser"}),
    ):
        Path(log).unlink(missing_ok=True)
        proc, argvs, _ = run_script(script, [], tmp_path, bad_secrets, bad_env)
        assert proc.returncode == 64 and argvs == [], proc.stderr


def test_vllm_reads_its_key_from_the_environment_not_argv(compose, tmp_path, fake_bin):
    fake_program(fake_bin, "vllm")
    svc = compose["services"]["vllm"]
    _, _, script, _ = svc["entrypoint"]
    proc, argvs, log = run_script(
        script, svc["command"], tmp_path, {"teacher_api_key": "sk-vllm", "hf_token": ""}, {}
    )
    assert proc.returncode == 0, proc.stderr
    assert argvs == [["serve", *svc["command"]]]
    assert "sk-vllm" not in json.dumps(argvs)
    seen = Path(f"{log}.env").read_text().splitlines()
    assert "VLLM_API_KEY=sk-vllm" in seen and not any(s.startswith("HF_TOKEN=") for s in seen)
    Path(log).unlink()
    proc, argvs, _ = run_script(script, svc["command"], tmp_path, {"teacher_api_key": ""}, {})
    assert proc.returncode == 64 and argvs == []


def test_minio_refuses_empty_root_credentials(compose, tmp_path, fake_bin):
    fake_program(fake_bin, "docker-entrypoint.sh")
    svc = compose["services"]["minio"]
    _, _, script, _ = svc["entrypoint"]
    args = shlex.split(svc["command"])
    proc, argvs, log = run_script(
        script, args, tmp_path, {"minio_root_user": "u", "minio_root_password": "p"}, {}
    )
    assert proc.returncode == 0 and argvs == [["server", "/data", "--console-address", ":9001"]], proc.stderr
    assert svc["environment"]["MINIO_ROOT_PASSWORD_FILE"] == "/run/secrets/minio_root_password"
    Path(log).unlink()
    proc, argvs, _ = run_script(
        script, args, tmp_path, {"minio_root_user": "u", "minio_root_password": ""}, {}
    )
    assert proc.returncode == 64 and argvs == []


# --- docker compose itself, where it is installed ---------------------------------------------------


def compose_plugin() -> str | None:
    """The docker compose v2 plugin, found without running anything."""
    if not shutil.which("docker"):
        return None
    dirs = [Path.home() / ".docker" / "cli-plugins"] + [
        Path(p) / "docker" / "cli-plugins"
        for p in ("/usr/local/lib", "/usr/local/libexec", "/usr/lib", "/usr/libexec")
    ]
    return next((str(d / "docker-compose") for d in dirs if (d / "docker-compose").exists()), None)


@pytest.mark.real  # runs `docker compose` (a client only: `config` needs no daemon)
@pytest.mark.skipif(compose_plugin() is None, reason="the docker compose v2 plugin is not installed here")
def test_docker_compose_config_renders_the_same_properties(tmp_path, deploy_root, filled_env, secret_values):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in filled_env.items()))
    proc = subprocess.run(
        ["docker", "compose", "--project-directory", str(deploy_root), "--env-file", str(env_file),
         "--profile", "gpu", "config", "--format", "json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COMPOSE_PROJECT_NAME": "octomed-check"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rendered = json.loads(proc.stdout)
    assert published_beyond_loopback(rendered) == []
    assert root_services(rendered) == []
    assert keys_on_command_lines(rendered, secret_values) == []
    assert key_values_anywhere(rendered, secret_values) == []
    assert services_without_limits(rendered) == []
    assert secret_holders(rendered, "TEACHER_API_KEY") == TEACHER_CALLERS
    assert secret_holders(rendered, "MINIO_ROOT_PASSWORD") == MINIO_ROOT_HOLDERS


def volume_owner_mismatches(compose: dict[str, Any]) -> list[str]:
    """Volumes that ``volume-init`` hands to a uid other than the ``user:`` of a service using them."""
    init = compose["services"][ROOT_ONESHOT]
    script = init["entrypoint"][2]
    owners = dict((path, owner) for owner, path in re.findall(r"^own (\d+:\d+) (\S+)$", script, flags=re.M))
    volume_of = {v.split(":")[1]: v.split(":")[0] for v in init["volumes"]}
    assert set(owners) == set(volume_of), (owners, volume_of)
    bad = []
    for path, owner in owners.items():
        for name, svc in compose["services"].items():
            if name != ROOT_ONESHOT and any(
                v.split(":")[0] == volume_of[path] for v in svc.get("volumes") or []
            ):
                if svc.get("user") != owner:
                    bad.append(f"{name}: {volume_of[path]} owned by {owner}, runs as {svc.get('user')}")
    return bad


def test_volume_init_hands_each_volume_to_the_user_of_its_service(compose, render, compose_text):
    assert volume_owner_mismatches(compose) == []
    # every named volume is either prepared by volume-init or copied up from its image (pgdata:
    # the postgres image's PGDATA belongs to uid 70, the user postgres runs as)
    prepared = {v.split(":")[0] for v in compose["services"][ROOT_ONESHOT]["volumes"]}
    assert set(compose["volumes"]) - prepared == {"pgdata"}
    old = mutated(compose_text, 'user: "10003:10003"', 'user: "10005:10005"')
    assert volume_owner_mismatches(render(old)) == [
        "vllm: vllm-home owned by 10003:10003, runs as 10005:10005"
    ]
