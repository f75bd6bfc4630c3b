"""The stage contract, run by each executor on the same stage with identical outputs.

The stage under test is the real filter stage (rejection sampling) over raw replies written as
the distill stage writes them, so what is compared is real Parquet, real markers, real verdicts.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.runs import shard_states
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, question_row
from octomed_data.stages import LocalExecutor, StageFailed, raise_for_failures, run_stage
from octomed_data.stages.filter import FilterStage

SHARDS = ("00000", "00001", "00002")


def write_run(root: str) -> RunPaths:
    """Three question shards and their raw replies (one right, one wrong, one truncated, one failed)."""
    paths = RunPaths.at(root)
    questions = storage.Dataset(paths.questions, QUESTION_SCHEMA)
    raw = storage.Dataset(paths.raw, SAMPLE_SCHEMA)
    for n, shard in enumerate(SHARDS):
        qs, rows = [], []
        for i in range(4):
            q = question_row(
                source=f"src{n % 2}",
                split="train",
                task_type="text_mcq",
                question=f"Question {shard}-{i}: which option is right?",
                options={"A": "alpha", "B": "beta", "C": "gamma", "D": "delta"},
                answer="B",
                input_file="x.jsonl",
                record_index=n * 10 + i,
            )
            qs.append(q)
            base = {
                "question_id": q["question_id"],
                "source": q["source"],
                "task_type": "text_mcq",
                "teacher": "t",
                "model": "m",
                "prompt_version": "v",
                "params_hash": "h",
                "gold_answer": "B",
            }
            rows += [
                base
                | {"sample_idx": 0, "reasoning": "think a while", "response": "Final answer: \\boxed{B}"},
                base | {"sample_idx": 1, "reasoning": "think", "response": "The answer is C."},
                base
                | {"sample_idx": 2, "reasoning": "long", "response": "So the", "finish_reason": "length"},
                base | {"sample_idx": 3, "reject_reason": "request_failed", "error": "HTTP 500"},
            ]
        questions.write_shard(shard, qs)
        raw.write_shard(shard, rows)
    return paths


def outputs(paths: RunPaths) -> dict[str, list]:
    """Every committed output row of the filter stage, per dataset and shard (bytes-independent)."""
    out = {}
    for uri in (paths.verdicts, paths.accepted):
        ds = storage.Dataset(uri)
        for shard in ds.manifest():
            out[f"{uri.rsplit('/', 1)[-1]}/{shard}"] = ds.read_shard(shard).to_pylist()
    return out


def check_result(result, paths: RunPaths) -> None:
    assert not result.failed and not result.pending
    assert {s: o.counts["accepted"] for s, o in result.outcomes.items()} == {s: 4 for s in SHARDS}
    stats = storage.read_json(paths.stats)
    assert stats["overall"]["samples"] == 36 and stats["overall"]["accepted"] == 12
    assert stats["overall"]["failed_requests"] == 12
    assert stats["overall"]["reject_reasons"] == {"truncated": 12, "wrong_answer": 12}


def test_local_executor_runs_the_contract(tmp_path) -> None:
    paths = write_run(str(tmp_path / "run"))
    stage = FilterStage(paths, samples_per_question=4)
    first = run_stage(stage, LocalExecutor(workers=2))
    check_result(first, paths)
    assert {o.state for o in first.outcomes.values()} == {"COMPLETED"}
    stamps = {s: i.committed_at for s, i in storage.Dataset(paths.verdicts).manifest().items()}

    # The committed marker is the one done-signal: a second pass touches nothing.
    again = run_stage(stage, LocalExecutor())
    assert {o.state for o in again.outcomes.values()} == {"REUSED"}
    assert {s: i.committed_at for s, i in storage.Dataset(paths.verdicts).manifest().items()} == stamps

    # Outputs deleted by hand are rebuilt; a re-committed input makes its output stale.
    storage.Dataset(paths.verdicts).delete_shard("00001")
    raw = storage.Dataset(paths.raw)
    raw.write_shard("00002", raw.read_shard("00002"))
    third = run_stage(stage, LocalExecutor())
    assert {s: o.state for s, o in third.outcomes.items()} == {
        "00000": "REUSED",
        "00001": "COMPLETED",
        "00002": "COMPLETED",
    }
    # A vanished input shard's outputs are dropped on a full pass (the one stale-shard cleaner).
    raw.delete_shard("00002")
    fourth = run_stage(stage, LocalExecutor())
    assert fourth.stale == ["00002"]
    assert set(storage.Dataset(paths.accepted).manifest()) == {"00000", "00001"}


def test_a_failing_shard_is_recorded_and_the_others_commit(tmp_path) -> None:
    paths = write_run(str(tmp_path / "run"))
    storage.Dataset(paths.questions).delete_shard("00001")  # the options of shard 00001 are gone
    result = run_stage(FilterStage(paths), LocalExecutor(retries=1))
    assert set(result.failed) == {"00001"} and "not committed" in result.failed["00001"]
    assert not result.final  # no statistics over a partial stage
    states = {s["shard"]: s for s in shard_states(paths, "filter")}
    assert states["00001"]["state"] == "FAILED" and states["00001"]["attempt"] == 2
    assert "\n" not in states["00001"]["error"] and states["00000"]["state"] == "COMPLETED"
    with pytest.raises(StageFailed, match=r"1 filter shard\(s\) failed: \['00001'\].*rerun me"):
        raise_for_failures(result, lambda bad: "rerun me")
    # Naming a shard re-runs exactly it; unknown names are one clear error.
    with pytest.raises(Exception, match="unknown filter shard 'nope'"):
        run_stage(FilterStage(paths), shards=["nope"])


def test_prefect_and_ray_executors_write_what_the_local_one_writes(
    tmp_path, prefect_harness, ray_local
) -> None:
    from prefect import flow

    from tasks.prefect_executor import PrefectExecutor
    from tasks.ray_executor import RayExecutor, RayPool

    local = write_run(str(tmp_path / "local"))
    run_stage(FilterStage(local), LocalExecutor())
    expected = outputs(local)
    assert len(expected) == 6

    @flow(name="executor-contract")
    def contract(root: str, ray: bool) -> list[str]:
        paths = write_run(root)
        result = run_stage(FilterStage(paths), PrefectExecutor(ray=ray))
        check_result(result, paths)
        return sorted(result.outcomes)

    assert contract(str(tmp_path / "prefect"), False) == list(SHARDS)
    assert outputs(RunPaths.at(str(tmp_path / "prefect"))) == expected
    assert contract(str(tmp_path / "prefect-ray"), True) == list(SHARDS)
    assert outputs(RunPaths.at(str(tmp_path / "prefect-ray"))) == expected

    ray_paths = write_run(str(tmp_path / "ray"))
    check_result(run_stage(FilterStage(ray_paths), RayExecutor()), ray_paths)
    assert outputs(ray_paths) == expected
    # One long-lived pool served every shard of both Ray runs.
    assert RayPool.get() is RayPool.get() and len(RayPool.get().workers) >= 1

    # Task runs are named after the stage and the shard.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        names = {t.name for t in client.read_task_runs(limit=200)}
    assert {f"filter {s}" for s in SHARDS} <= names


def test_parquet_files_are_complete_and_readable(tmp_path) -> None:
    paths = write_run(str(tmp_path / "run"))
    run_stage(FilterStage(paths), LocalExecutor())
    for uri in storage.Dataset(paths.accepted).files():
        assert pq.read_table(uri).num_rows == 4
