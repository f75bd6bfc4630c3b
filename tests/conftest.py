"""Shared fixtures: real benchmark files, a real S3-compatible server on loopback, local Ray, Prefect.

Environment for closed-network test runs is set before anything imports Prefect or Ray.

Tiers: a test that starts or needs a real component (by the fixtures, paths and test names in
``tests/support/tiers.py``) is marked ``real`` at collection; ``pytest -m "not real"`` is the fast
tier. A fast-tier test that starts such a component anyway (a subprocess whose command line
``tiers.heavy_command`` recognises) fails and says to mark it.

Missing benchmark files (``../shared/data``, or ``$OCTOMED_SHARED_DATA``) skip the tests that read
them, with the reason; ``OCTOMED_REQUIRE_SHARED_DATA=1`` makes that a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_API_ENABLE_HTTP2", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent

# The two-raylet cluster tests run in their own pytest process (tests/real/test_clusters.py starts
# it with OCTOMED_CLUSTER_TESTS=1): a driver of a cluster that was killed can be ended by Ray later.
collect_ignore_glob = [] if os.environ.get("OCTOMED_CLUSTER_TESTS") else ["real/cluster/*"]
# The real tier runs in several pytest processes at once (pytest-xdist): a plain ray.init() would
# join the newest cluster started with `ray start` (the cluster tests') instead of starting its own.
# RAY_ADDRESS=local makes it start its own; the cluster tests' process names its clusters itself.
if not os.environ.get("OCTOMED_CLUSTER_TESTS"):
    os.environ.setdefault("RAY_ADDRESS", "local")
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.net import free_port  # noqa: E402 (after the path is set)
from tests.support.tiers import REAL_TESTS, SLOW_FILES, heavy_command, real_reason  # noqa: E402


def _shared_data_dir() -> Path:
    env = os.environ.get("OCTOMED_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


if os.environ.get("OCTOMED_SHARED_DATA"):
    # Evaluation reads its benchmark files from $OCTOMED_EVAL_DATA, else ../shared/data.
    os.environ.setdefault("OCTOMED_EVAL_DATA", os.environ["OCTOMED_SHARED_DATA"])

SHARED_DATA_REQUIRED = os.environ.get("OCTOMED_REQUIRE_SHARED_DATA", "") not in ("", "0")


def _shared_data_missing() -> str | None:
    """Why the real benchmark files are unusable (one line), or None when they are there."""
    path = _shared_data_dir()
    if (path / "README.md").exists():
        return None
    return f"real benchmark files not found at {path} (set OCTOMED_SHARED_DATA; OCTOMED_REQUIRE_SHARED_DATA=1 makes this a failure)"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public benchmark files (../shared/data). Missing: a skip with the reason, or a
    failure when ``OCTOMED_REQUIRE_SHARED_DATA=1``."""
    missing = _shared_data_missing()
    if missing and SHARED_DATA_REQUIRED:
        pytest.fail(missing, pytrace=False)
    if missing:
        pytest.skip(missing)
    return _shared_data_dir()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that reads the missing benchmark files without the ``shared_data`` fixture (evaluation
    defaults to ../shared/data) is skipped with the reason instead of failing, unless required."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or report.outcome != "failed" or SHARED_DATA_REQUIRED:
        return
    missing = _shared_data_missing()
    if missing is None:
        return
    folder = str(_shared_data_dir())
    seen, exc = set(), call.excinfo.value
    while exc is not None and id(exc) not in seen:  # the error or one of its causes names the folder
        seen.add(id(exc))
        if folder in str(exc) or folder in str(getattr(exc, "filename", "") or ""):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), (item.location[1] or 0) + 1, f"Skipped: {missing}")
            return
        exc = exc.__cause__ or exc.__context__


if os.environ.get("OCTOMED_TEST_CPU"):  # per-test CPU seconds (tests/support/cputime.py)
    from tests.support.cputime import CpuRecorder  # noqa: E402

    _CPU = CpuRecorder(os.environ["OCTOMED_TEST_CPU"])

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        started = _CPU.start()
        yield
        _CPU.finish(item.nodeid, started)


# --- Tiers -------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config, items) -> None:
    tests = Path(__file__).resolve().parent
    names: dict[str, set[str]] = {}
    for item in items:
        rel = Path(item.path).resolve().relative_to(tests).as_posix()
        names.setdefault(rel, set()).add(getattr(item, "originalname", item.name))
        if real_reason(rel, item.name, item.fixturenames):
            item.add_marker(pytest.mark.real)
    rank = {rel: i for i, rel in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(Path(item.path).resolve().relative_to(tests).as_posix(), len(rank)))
    stale = {f"{rel}::{n}" for rel, listed in REAL_TESTS.items() if rel in names for n in listed - names[rel]}
    if stale:  # a renamed test would silently fall into the fast tier
        raise pytest.UsageError(
            f"tests/support/tiers.py REAL_TESTS names tests that do not exist: {sorted(stale)}"
        )


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_real_component(request, monkeypatch):
    """A test outside the real tier that starts a real component fails, naming it."""
    if request.node.get_closest_marker("real"):
        yield
        return
    started: list[str] = []
    original = subprocess.Popen.__init__

    def init(self, args, *a, **kw):
        heavy = heavy_command(args)
        if heavy:
            started.append(f"{heavy}: {args if isinstance(args, str) else ' '.join(map(str, args))}"[:300])
        original(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", init)
    yield
    if started:
        pytest.fail(
            "this test starts a real component; add it to REAL_TESTS in tests/support/tiers.py:\n"
            + "\n".join(started),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP server on loopback (moto server mode, as s3fs's own tests use)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "OCTOMED_S3_ENDPOINT_URL")
    }
    # Throwaway credentials for the loopback server only.
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["OCTOMED_S3_ENDPOINT_URL"] = endpoint
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> str:
    """A fresh bucket on the loopback S3 server; returns ``s3://bucket``."""
    import uuid

    import s3fs

    name = f"octomed-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing")
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray for the session (~2 s start, ~0.9 GB).

    Started after the loopback S3 server's credentials are in the environment: Ray workers keep
    the environment Ray started with, and training workers upload checkpoints there.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary SQLite API server) for the session (~9 s start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter of a real vLLM (CPU build, own venv; built once and cached, ~2-4 min).

    It cannot be built: the test fails with one line saying why. Never skipped.
    """
    from octomed_data.inference.vllm_service import CPU_SPEC, VLLMUnavailable, ensure_venv

    try:
        return ensure_venv(CPU_SPEC, log=lambda m: print(m, file=sys.stderr, flush=True))
    except VLLMUnavailable as exc:
        pytest.fail(f"real vLLM unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory) -> Path:
    """A tiny random Qwen2 that the vLLM CPU attention kernel accepts (head_dim 64)."""
    from training.tiny import build_text_model

    return build_text_model(tmp_path_factory.mktemp("vllm-model") / "tiny-r1", hidden_size=256)


@pytest.fixture(scope="session")
def vllm_server(vllm_python, tiny_vllm_model, tmp_path_factory):
    """A real vLLM OpenAI server on loopback with the deepseek_r1 reasoning parser (1-5 min start)."""
    from octomed_data.inference.vllm_service import VLLMServer, VLLMUnavailable

    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    server = VLLMServer(
        tiny_vllm_model, python=vllm_python, served_model_name="tiny-r1", max_model_len=2048, log_path=log
    )
    try:
        server.start(timeout_s=900)
    except VLLMUnavailable as exc:
        pytest.fail(f"real vLLM server did not start: {exc}", pytrace=False)
    yield server
    server.stop()
