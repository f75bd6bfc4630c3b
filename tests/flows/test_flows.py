"""The Prefect flows on local Ray: factory end to end, resume after a kill, one failed shard re-run
alone, the mixture -> training automation, and the dashboard artifacts (queried from the API).

The sandbox teacher stands in for a model everywhere here (rows say teacher=sandbox).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.runs import shard_states
from tests.support.flows import artifact_keys

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "octomed_data" / "sample_data"
SAMPLES = 2


def write_recipe(
    tmp: Path, *, training: bool = False, concurrent: int = 2, latency: float = 0.0, ray_stages: tuple = ()
) -> str:
    """A small recipe: 80 PathVQA textbook questions (4 shards) + 8 MedQA test items (removed)."""
    recipe = {
        "name": "flowtest",
        "store": str(tmp / "store"),
        "shard_size": 20,
        "sources": [
            {
                "format": "pathvqa",
                "input": str(SAMPLE_DATA / "pathvqa" / "QA_pairs_vb.sample80.json"),
                "name": "pathvqa",
            },
            {
                "format": "medqa",
                "input": str(SAMPLE_DATA / "medqa" / "phrases_no_exclude_test.head8.jsonl"),
                "name": "medqa_test",
            },
        ],
        "distill": {
            "samples": SAMPLES,
            "max_concurrent_shards": concurrent,
            "sandbox": {"latency_s": latency},
        },
        "mixture": {"validation_fraction": 0.2},
        "training": {
            "enabled": training,
            "tiny_model": "text",
            "config": {
                "max_steps": 1,
                "global_batch_size": 1,
                "max_seq_len": 512,
                "zero_stage": 0,
                "gradient_checkpointing": False,
            },
        },
        "evaluation": {"enabled": training, "config": {"limit": 2, "max_new_tokens": 8, "batch_size": 2}},
        "ray_stages": list(ray_stages),
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def markers(paths: RunPaths, dataset: str) -> dict[str, float]:
    """committed_at of every committed shard of a distill output dataset."""
    ds = storage.Dataset(storage.join(paths.stage("distill"), dataset))
    return {name: info.committed_at for name, info in ds.manifest().items()}


@pytest.fixture(scope="module")
def finished_run(prefect_harness, ray_local, tmp_path_factory):
    """One clean factory run (ingest .. export + report), shared by several tests."""
    from flows.common import RunParams
    from flows.factory import factory_flow

    tmp = tmp_path_factory.mktemp("factory")
    # The filter, mixture and export shards run on (local) Ray, as a recipe asks for a cluster.
    recipe = write_recipe(tmp, ray_stages=("filter", "mixture", "export"))
    t0 = time.time()
    result = factory_flow(run=RunParams(recipe_path=recipe, run_id="clean"), stages=None)
    return result, RunPaths(str(tmp / "store"), "clean"), time.time() - t0


def test_factory_end_to_end(finished_run):
    result, paths, _ = finished_run
    raw = storage.Dataset(storage.join(paths.stage("distill"), "raw"))
    questions = storage.Dataset(paths.questions).num_rows()
    ingested = storage.Dataset(storage.join(paths.stage("ingest"), "questions")).num_rows()
    removed = list(storage.Dataset(storage.join(paths.stage("decontaminate"), "removed")).iter_rows())
    assert questions == ingested - len(removed) and questions > 40
    # all 8 MedQA test items are removed on purpose; no kept question is a benchmark test item
    assert sum(r["source"] == "medqa" for r in removed) == 8
    assert all(r["source"] != "medqa" for r in storage.Dataset(paths.questions).iter_rows())
    assert raw.num_rows() == questions * SAMPLES
    assert {r["teacher"] for r in raw.iter_rows()} == {"sandbox"}
    mix = result["mixture"]
    assert mix["rows_train"] > 0 and mix["rows_validation"] > 0
    trl = storage.Dataset(result["export"]["datasets"]["trl"]["train"])
    assert trl.num_rows() == mix["rows_train"]
    report = storage.read_bytes(result["report"]["report"]).decode()
    assert "NOT model traces" in report and f"removed by decontamination | {len(removed)}" in report
    states = shard_states(paths, "distill")
    assert len(states) == len(storage.Dataset(paths.questions).manifest())
    assert {s["state"] for s in states} == {"COMPLETED"}
    assert storage.exists(storage.join(paths.root, "run.json"))
    # ray_stages: the filter's shards ran in Ray actors (each records the node that ran it).
    filtered = shard_states(paths, "filter")
    assert filtered and all(s.get("node_id") for s in filtered), filtered


def test_artifacts_created(finished_run):
    kinds = (
        "shards",
        "rejections",
        "cost",
        "report",
        "distill-progress",
        "mixture",
        "export",
        "decontamination",
    )
    wanted = [f"{kind}-clean" for kind in kinds]
    assert artifact_keys(wanted) == set(wanted)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (progress,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["distill-progress-clean"]))
        )
        assert float(progress.data) == 100.0
        reports = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["report-clean"]))
        )
        # The filter flow publishes it, the factory's end replaces it (issue 26: replaced, not
        # appended; two versions were kept before); it embeds the plot.
        assert len(reports) == 1 and all("data:image/png;base64," in r.data for r in reports)


def test_factory_run_links_every_stage_artifact(finished_run):
    """Defect 6: the factory run's Artifacts tab showed 4 of the 8 artifacts (the stages' cards
    belong to their subflow runs). Now one card on the factory run links every one of them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    result, paths, _ = finished_run
    assert result["artifacts"] == "artifacts-clean"
    with get_client(sync_client=True) as client:
        (index,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["artifacts-clean"]))
        )
        factory_run = client.read_flow_run(index.flow_run_id)
        assert factory_run.parameters["run"]["run_id"] == "clean"  # on the factory run itself
        flow = client.read_flow(factory_run.flow_id)
    assert flow.name == "factory"
    for kind in (
        "shards",
        "rejections",
        "cost",
        "report",
        "distill-progress",
        "mixture",
        "export",
        "decontamination",
    ):
        assert f"[{kind}-clean](/artifacts/key/{kind}-clean)" in index.data
    for stage in ("ingest", "decontaminate", "distill", "filter"):
        assert f"shards-{stage}-clean" in index.data


def _artifacts_of(run_id: str) -> list[tuple[str, int]]:
    """(key, bytes) of every artifact (every version) of the run, from the API."""
    import json

    from prefect.client.orchestration import get_client

    out: list[tuple[str, int]] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_artifacts(limit=200, offset=len(out))
            out += [(a.key or "", len(json.dumps(a.data)) + len(a.description or "")) for a in page]
            if len(page) < 200:
                break
    return sorted((k, n) for k, n in out if k.endswith(f"-{run_id}"))


def test_a_second_pass_replaces_the_artifacts_and_flow_runs_carry_the_run_id(finished_run):
    """Issue 26: a pass over a run replaced its cards, it did not append to them (they doubled on
    every pass). Issue 24: the run's flow runs are named after the run id and tagged with it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flows.common import RunParams
    from flows.factory import factory_flow
    from flows.naming import run_tag

    _, paths, _ = finished_run
    first = _artifacts_of("clean")
    assert len(first) >= 12 and len({k for k, _ in first}) == len(first)  # one version per key
    factory_flow(run=RunParams(run_id="clean", store=paths.store), stages=None)
    second = _artifacts_of("clean")
    assert second == first  # the same keys, one version each, the same bytes
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[run_tag("clean")])), limit=200
        )
        flows = {client.read_flow(r.flow_id).name for r in runs}
    assert {r.name for r in runs} == {"clean"}
    assert {"factory", "ingest", "decontaminate", "distill", "filter", "mixture", "export"} <= flows


def test_a_big_runs_shard_card_is_a_summary_and_the_full_table_a_file(prefect_harness, tmp_path):
    """Past SHARD_TABLE_ROWS shards the card is a summary (per stage, failed shards) linking the
    full table, written as CSV into the run's report folder; a second publish replaces the card."""
    import csv

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.artifacts import SHARD_TABLE_ROWS, publish_shard_table

    paths = RunPaths(str(tmp_path / "store"), "big")
    n = SHARD_TABLE_ROWS + 1
    for i in range(n):
        state = "FAILED" if i == 3 else "COMPLETED"
        storage.write_json(
            paths.state_uri("distill", f"s-{i:05d}"),
            {"stage": "distill", "shard": f"s-{i:05d}", "state": state, "attempt": 1, "questions": 2},
        )
    for _ in range(2):
        assert publish_shard_table(paths, "distill") == n
    with get_client(sync_client=True) as client:
        (card,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["shards-distill-big"]))
        )
    assert card.type == "markdown" and "## distill: 301 shards" in card.data and "| FAILED | 1 |" in card.data
    assert "s-00003" in card.data and "s-00004" not in card.data
    table = Path(paths.report) / "shards-distill.csv"
    assert str(table) in card.data
    with open(table, encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == n


def test_failed_shard_rerun_alone(finished_run, monkeypatch, tmp_path):
    """One shard fails (injected teacher outage); re-running it alone completes the run exactly."""
    from flows.common import RunParams, ShardFailures
    from flows.factory import factory_flow
    from tasks.ray_executor import RayPool

    clean_result, clean_paths, _ = finished_run
    real = RayPool.run
    broken = "pathvqa-00002"
    calls: list[str] = []

    def flaky(self, stage, shard, **kw):
        calls.append(shard)
        if shard == broken:
            raise ConnectionError("injected: teacher endpoint unreachable for this shard")
        return real(self, stage, shard, **kw)

    monkeypatch.setattr(RayPool, "run", flaky)
    recipe = write_recipe(tmp_path)
    with pytest.raises(ShardFailures, match=broken):
        factory_flow(run=RunParams(recipe_path=recipe, run_id="flaky"))
    paths = RunPaths(str(tmp_path / "store"), "flaky")
    failed = {s["shard"]: s for s in shard_states(paths, "distill")}
    assert failed[broken]["state"] == "FAILED" and "injected" in failed[broken]["error"]
    before = markers(paths, "raw")
    assert broken not in before and len(before) == len(markers(clean_paths, "raw")) - 1
    assert not storage.exists(paths.stage("mixture"))  # nothing downstream of a failed shard

    calls.clear()
    spy_calls: list[str] = []

    def spy(self, stage, shard, **kw):
        spy_calls.append(shard)
        return real(self, stage, shard, **kw)

    monkeypatch.setattr(RayPool, "run", spy)
    position = sorted(storage.Dataset(paths.questions).manifest()).index(broken)
    # `--shard N` takes a name or a position in the run's shard list; use the position here
    result = factory_flow(run=RunParams(recipe_path=recipe, run_id="flaky", shards=[str(position)]))
    assert spy_calls == [broken]  # exactly that shard, no other
    after = markers(paths, "raw")
    assert {k: v for k, v in after.items() if k != broken} == before  # others untouched
    assert set(after) == set(markers(clean_paths, "raw"))
    # Outputs as if nothing had failed: same rows as the clean run, manifest complete.
    for name in ("raw", "accepted"):
        ds = storage.Dataset(getattr(paths, name))
        clean = storage.Dataset(getattr(clean_paths, name))
        assert ds.num_rows() == clean.num_rows()
    assert result["mixture"]["rows_train"] == clean_result["mixture"]["rows_train"]
    assert {s["state"] for s in shard_states(paths, "distill")} == {"COMPLETED"}


def test_killed_run_resumes_without_redoing_shards(prefect_harness, ray_local, tmp_path, monkeypatch):
    """SIGKILL the factory mid-distillation; resuming the run id reuses finished shards."""
    from flows.common import RunParams
    from flows.factory import factory_flow
    from tasks.ray_executor import RayPool

    recipe = write_recipe(tmp_path, concurrent=1, latency=0.02)
    paths = RunPaths(str(tmp_path / "store"), "killed")
    env = dict(os.environ, OCTOMED_TRACEBACK="1", RAY_AUTH_MODE="disabled")
    env.pop("PREFECT_API_URL", None)  # the child runs its own local Prefect, as a user would
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "run",
            recipe,
            "--run-id",
            "killed",
            "--stage",
            "ingest",
            "--stage",
            "decontaminate",
            "--stage",
            "distill",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(
            s["state"] == "COMPLETED" for s in shard_states(paths, "distill")
        ):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {s["shard"] for s in shard_states(paths, "distill") if s["state"] == "COMPLETED"}
    assert done_before and len(done_before) < len(storage.Dataset(paths.questions).manifest())
    stamps = markers(paths, "raw")

    real = RayPool.run
    called: list[str] = []

    def spy(self, stage, shard, **kw):
        called.append(shard)
        return real(self, stage, shard, **kw)

    monkeypatch.setattr(RayPool, "run", spy)
    factory_flow(
        run=RunParams(recipe_path=recipe, run_id="killed"),
        stages=["ingest", "decontaminate", "distill", "filter"],
    )
    assert called and not set(called) & done_before  # finished shards were not redone
    after = markers(paths, "raw")
    assert all(after[s] == stamps[s] for s in done_before)
    raw = storage.Dataset(storage.join(paths.stage("distill"), "raw"))
    rows = list(raw.iter_rows())
    assert len(rows) == storage.Dataset(paths.questions).num_rows() * SAMPLES  # none lost, none duplicated
    assert len({(r["question_id"], r["sample_idx"]) for r in rows}) == len(rows)


def test_outputs_deleted_by_hand_are_rebuilt_not_served_from_cache(prefect_harness, ray_local, tmp_path):
    """Same run id, outputs deleted by hand: the cache must not answer for outputs that are gone."""
    from flows.common import RunParams
    from flows.factory import factory_flow

    recipe = write_recipe(tmp_path)
    stages = ["ingest", "decontaminate", "distill", "filter"]
    params = RunParams(recipe_path=recipe, run_id="stale")
    paths = RunPaths(str(tmp_path / "store"), "stale")
    distill = paths.stage("distill")

    def rows() -> dict[str, int]:
        uris = {
            "ingested": storage.join(paths.stage("ingest"), "questions"),
            "kept": paths.questions,
            "removed": storage.join(paths.stage("decontaminate"), "removed"),
            "raw": paths.raw,
            "accepted": paths.accepted,
        }
        return {k: storage.Dataset(u).num_rows() for k, u in uris.items()}

    factory_flow(run=params, stages=stages)
    before = rows()
    assert all(before.values()), before
    # the shard with the most samples (some shards are emptied by decontamination)
    raw_manifest = storage.Dataset(storage.join(distill, "raw")).manifest()
    victim = max(raw_manifest, key=lambda name: raw_manifest[name].rows)
    # Whole ingest + decontaminate folders gone; one distilled shard's outputs gone (its done
    # marker and journal stay: the engine's own bookkeeping would call the shard finished).
    shutil.rmtree(paths.stage("ingest"))
    shutil.rmtree(paths.stage("decontaminate"))
    for uri in (paths.raw, paths.accepted):
        storage.Dataset(uri).delete_shard(victim)
    factory_flow(run=params, stages=stages)
    assert rows() == before
    assert victim in storage.Dataset(storage.join(distill, "raw")).manifest()


def test_automation_fires_training_deployment(finished_run):
    """A completed export flow run starts the training deployment with that run's parameters."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.automation import AUTOMATION_NAME, ensure_training_automation
    from flows.common import RunParams
    from flows.export import export_flow
    from flows.train import train_flow

    _, paths, _ = finished_run
    deployment_id = train_flow.to_deployment(name="train").apply()
    automation = ensure_training_automation(deployment_id)
    assert automation is not None and automation.name == AUTOMATION_NAME
    time.sleep(2)  # the triggers service loads new automations periodically
    export_flow(RunParams(run_id=paths.run_id, store=paths.store))  # the export is committed: train
    runs = []
    deadline = time.time() + 60
    with get_client(sync_client=True) as client:
        while time.time() < deadline and not runs:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
            time.sleep(1)
    assert runs, "the automation did not start the training deployment"
    assert runs[0].parameters["params"]["run"]["run_id"] == paths.run_id
    assert ensure_training_automation(deployment_id, enabled=False) is None


def test_rerun_unknown_run_is_one_line_error(tmp_path, capsys):
    from cli import main

    assert main(["rerun", "nope", "--shard", "0", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no run 'nope'")


def test_relative_store_becomes_absolute(tmp_path, monkeypatch):
    """Image URIs in Parquet and exports derive from the store: never cwd-relative."""
    monkeypatch.chdir(tmp_path)
    paths = RunPaths("./runs/demo", "r")
    assert paths.store == str(tmp_path / "runs" / "demo") and paths.root.startswith(str(tmp_path))
    assert RunPaths("s3://bucket/x", "r").store == "s3://bucket/x"


def test_train_flow_launches_torchrun_then_registers_and_evaluates(finished_run):
    """The dashboard's train deployment path: torchrun job, checkpoint registered, eval artifacts published."""
    from flows.common import RunParams
    from flows.train import TrainParams, evaluate_flow, train_flow

    _, paths, _ = finished_run
    run = RunParams(run_id=paths.run_id, store=paths.store)
    out = train_flow(TrainParams(run=run, launcher="torchrun", processes=1, max_steps=1, evaluate=True))
    assert out["train"]["steps"] == 1 and math.isfinite(out["train"]["final_loss"])
    assert out["checkpoint"]["marker"]["final"] and out["checkpoint"]["marker"]["world_size"] == 1
    latest = storage.read_json(storage.join(paths.store, "checkpoints", "latest.json"))
    assert latest["checkpoint_uri"] == paths.stage("checkpoints")
    # This run's recipe leaves evaluation off; the evaluate flow is its own deployment too.
    assert "evaluate" not in out
    ev = evaluate_flow(run)
    assert ev["items"] == 2 and ev["predictions"] == 2 * 5  # limit 2 removed MedQA items x 5 seeds
    assert set(ev["per_benchmark"]) == {"medqa"}
    keys = [f"{k}-{paths.run_id}" for k in ("training", "evaluation", "evaluation-report")]
    assert artifact_keys(keys) == set(keys)
