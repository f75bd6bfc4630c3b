"""Exit codes that tell the truth (issue 25): a command exits 0 only when every shard it was asked
for is committed; otherwise non-zero and one ``error:`` line naming the shards that are not, and why.

The shards here are kept from committing the way it happens in the field: another run holds the
shard's lease (a real lease, held by "another run"), or the shard's writer loses its lease or its
store mid-shard. The sandbox teacher answers; the lease wait is shrunk to a second.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from cli import main
from octomed_data import storage
from octomed_data.errors import StorageError
from octomed_data.layout import RunPaths
from octomed_data.lease import LeaseLost, shard_lease
from octomed_data.sandbox import start_sandbox
from octomed_data.schema import SAMPLE_SCHEMA
from octomed_data.stages.base import ShardOutcome, StageResult
from octomed_data.stages.committed import (
    LEASE_HELD,
    LEASE_LOST,
    STORE_UNREACHABLE,
    not_committed,
    not_committed_line,
    reason,
    user_message,
)
from tests.support.distill import KEY, make_questions
from tests.support.orchestration import write_inputs

MEDQA = (
    Path(__file__).parents[1]
    / "octomed_data"
    / "sample_data"
    / "medqa"
    / "phrases_no_exclude_test.head8.jsonl"
)


@pytest.fixture
def short_leases(monkeypatch):
    """A lease held by someone else is waited for 2 x 0.5 s, not 30 s."""
    monkeypatch.setattr("octomed_data.stages.runner.LEASE_TTL_S", 0.5)


@contextmanager
def held_by_another_run(root: str, stage: str, shard: str):
    lease = shard_lease(RunPaths.at(root), stage, shard, "another-run:", ttl_s=120)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = errors(captured.err)
    assert len(lines) == 1, captured.err[-3000:]
    assert "Traceback" not in captured.err
    return lines[0]


# ---------------------------------------------------------------------------- the reasons, pure


def test_reasons_from_the_runners_error_lines() -> None:
    assert reason("LeaseLost: s3://b/out/state/distill/00001.lease: lost to 'x'") == LEASE_LOST
    assert reason("LeaseHeld: file:///o/state/distill/00001.lease is held by 'x'") == LEASE_HELD
    assert reason("StorageError: s3://b/o: EndpointConnectionError: Could not connect") == STORE_UNREACHABLE
    assert (
        reason("OSError: x <- caused by ReadTimeoutError: Read timeout on endpoint URL") == STORE_UNREACHABLE
    )
    assert reason("ValueError: bad row").startswith("failed: ValueError: bad row")
    assert user_message("StorageError: mixture input not found: /x") == "mixture input not found: /x"
    assert user_message("LeaseHeld: held") is None and user_message("ValueError: no") is None
    result = StageResult("distill")
    result.outcomes = {
        "a": ShardOutcome("a", "COMPLETED"),
        "b": ShardOutcome("b", "FAILED", error="LeaseLost: lost"),
        "c": ShardOutcome("c", "FAILED", error="ShardIncomplete: shard c: 2 sample(s) failed"),
        "d": ShardOutcome("d", "FAILED", error="LeaseHeld: held"),
    }
    result.pending = ["e"]
    missing = not_committed(result, ["a", "b", "c", "d", "e"], {"c": "2 sample(s) failed", "b": "ignored"})
    assert missing == {"b": LEASE_LOST, "c": "2 sample(s) failed", "d": LEASE_HELD, "e": "not done"}
    line = not_committed_line("distill", missing, 5)
    assert line == (
        "4 of 5 distill shard(s) not committed: b (lease lost); c (2 sample(s) failed); "
        "d (lease held by another run); e (not done)"
    )


# ---------------------------------------------------------------------------- distill


def distill_args(q_uri: str, out: str, base_url: str) -> list[str]:
    return [
        "distill", q_uri, "--base-url", base_url, "--model", "sandbox-r1", "--teacher-name", "sandbox",
        "--samples", "2", "--executor", "local", "--no-progress", "--out", out,
    ]  # fmt: skip


def raw_keys(out: str) -> Counter:
    rows = storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_all().to_pylist()
    return Counter((r["question_id"], r["sample_idx"]) for r in rows)


def test_distill_exits_non_zero_while_another_run_holds_a_shard_then_completes_exactly(
    tmp_path, monkeypatch, capsys, short_leases
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, 6, shard="00000") + make_questions(q_uri, 6, shard="00001", offset=6)
    with start_sandbox() as sb:
        with held_by_another_run(out, "distill", "00001"):
            rc = main(distill_args(q_uri, out, sb.base_url))
        line = one_error_line(capsys)
        assert rc == 1
        assert line.startswith(
            "error: 1 of 2 distill shard(s) not committed: 00001 (lease held by another run)"
        )
        assert {q for q, _ in raw_keys(out)} == {q["question_id"] for q in questions[:6]}
        sent = sb.stats()["requests"]
        assert sent == 12
        # The re-run completes exactly what is missing: every question's samples once.
        assert main(distill_args(q_uri, out, sb.base_url)) == 0
        captured = capsys.readouterr()
        assert errors(captured.err) == []
        assert sb.stats()["requests"] - sent == 12
        assert raw_keys(out) == Counter({(q["question_id"], i): 1 for q in questions for i in range(2)})
        summary = json.loads(captured.out)
        assert summary["complete"] and summary["new_samples"] == 12 and summary["stored_before"] == 12
        assert summary["requests"] == 12
        # Everything done: the message says nothing was sent, and nothing is.
        assert main(distill_args(q_uri, out, sb.base_url)) == 0
        captured = capsys.readouterr()
        assert sb.stats()["requests"] - sent == 12
    assert "24/24 samples stored (0 new, 24 already stored)" in captured.err
    assert re.search(r"\b0 failed, 0 requests\b", captured.err), captured.err


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (LeaseLost("file:///o/state/distill/00001.lease: lost to 'x' (epoch 1 is over); not writing seg"), LEASE_LOST),
        (StorageError("s3://b/out/raw: EndpointConnectionError: Could not connect to the endpoint URL"), STORE_UNREACHABLE),
    ],
)  # fmt: skip
def test_distill_shard_lost_mid_run_is_named_with_its_reason(
    tmp_path, monkeypatch, capsys, error, why
) -> None:
    from octomed_data.stages.distill import DistillStage

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 3, shard="00000")
    make_questions(q_uri, 3, shard="00001", offset=3)
    real = DistillStage.arun_shard

    async def lost_on_00001(self, shard):
        if shard == "00001":
            raise error
        return await real(self, shard)

    monkeypatch.setattr(DistillStage, "arun_shard", lost_on_00001)
    with start_sandbox() as sb:
        assert main(distill_args(q_uri, out, sb.base_url)) == 1
    assert one_error_line(capsys).startswith(f"error: 1 of 2 distill shard(s) not committed: 00001 ({why})")


# ---------------------------------------------------------------------------- ingest, decontaminate


def test_ingest_names_the_shard_another_run_holds(tmp_path, capsys, short_leases) -> None:
    out = str(tmp_path / "ing")
    with held_by_another_run(out, "ingest", "medqa"):
        rc = main(["ingest", "medqa", str(MEDQA), "--out", out, "--no-progress"])
    assert rc == 2
    assert one_error_line(capsys) == (
        "error: 1 ingest shard(s) not committed: medqa (lease held by another run); "
        "run the same command again to complete them"
    )
    assert main(["ingest", "medqa", str(MEDQA), "--out", out, "--no-progress"]) == 0


def test_decontaminate_names_the_shard_another_run_holds(tmp_path, capsys, short_leases) -> None:
    ing, out = str(tmp_path / "ing"), str(tmp_path / "dec")
    assert main(["ingest", "medqa", str(MEDQA), "--out", ing, "--no-progress"]) == 0
    (shard,) = storage.Dataset(storage.join(ing, "questions")).manifest()
    capsys.readouterr()
    with held_by_another_run(out, "decontaminate", shard):
        rc = main(["decontaminate", storage.join(ing, "questions"), "--out", out, "-q"])
    assert rc == 2
    assert one_error_line(capsys) == (
        f"error: 1 decontaminate shard(s) not committed: {shard} (lease held by another run); "
        "run the same command again to complete them"
    )
    assert not storage.Dataset(storage.join(out, "questions")).manifest()


# ---------------------------------------------------------------------------- global steps: mix, export


def test_mix_and_export_run_their_global_step_marker_and_name_a_held_one(
    shared_data, tmp_path, capsys, short_leases
) -> None:
    accepted, questions = write_inputs(shared_data, str(tmp_path / "in"), n_text=6, n_image=1)
    mix, exp = str(tmp_path / "mix"), str(tmp_path / "export")
    mix_args = [
        "mix",
        "--accepted",
        accepted,
        "--questions",
        questions,
        "--out",
        mix,
        "--validation-fraction",
        "0.3",
    ]
    with held_by_another_run(mix, "mixture", "all"):
        assert main(mix_args) == 2
    assert one_error_line(capsys) == (
        "error: 1 of 1 mixture shard(s) not committed: all (lease held by another run); "
        "run the same command again to complete them"
    )
    assert not storage.exists(storage.join(mix, "train"))
    assert main(mix_args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["rows_train"] > 0 and storage.Dataset(storage.join(mix, "_done")).manifest()
    # Done is the marker: the same command again rebuilds nothing and reports the same mixture.
    committed = storage.Dataset(storage.join(mix, "train")).manifest()
    assert main(mix_args) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert storage.Dataset(storage.join(mix, "train")).manifest() == committed

    with held_by_another_run(exp, "export", "all"):
        assert main(["export", mix, "--out", exp, "--format", "trl"]) == 2
    assert "export shard(s) not committed: all (lease held by another run)" in one_error_line(capsys)
    assert main(["export", mix, "--out", exp, "--format", "trl"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (
        "llamafactory" not in result["datasets"]
        and "trl" in result["datasets"]
        and storage.Dataset(storage.join(exp, "_done")).manifest()
    )
    # A user error of the step stays its own one line (exit 2), as before the step ran by run_stage.
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "e2")]) == 2
    line = one_error_line(capsys)
    assert "not committed" not in line and "nope" in line, line


# ---------------------------------------------------------------------------- refilter


def test_refilter_names_the_filter_shard_another_run_holds(
    tmp_path, monkeypatch, capsys, short_leases
) -> None:
    from tests.support.rejudge import KEY_ENV, build_run

    monkeypatch.setenv(KEY_ENV, "sk-exit-codes-test")
    with start_sandbox() as sb:
        paths = build_run(tmp_path / "store", sb.base_url)
        shards = sorted(storage.Dataset(paths.verdicts).manifest())
        argv = ["refilter", paths.run_id, "--store", paths.store, "--filter-only"]
        capsys.readouterr()
        with held_by_another_run(paths.root, "filter", shards[-1]):
            assert main(argv) == 2
        assert one_error_line(capsys) == (
            f"error: 1 of {len(shards)} filter shard(s) not committed: {shards[-1]} (lease held by another run); "
            "run the same command again to complete them"
        )
        assert main(argv) == 0
    assert errors(capsys.readouterr().err) == []


def test_filter_difficulty_names_the_shard_another_run_holds(
    tmp_path, monkeypatch, capsys, short_leases
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "grading")
    make_questions(q_uri, 3, shard="00000")
    make_questions(q_uri, 3, shard="00001", offset=3)
    with start_sandbox() as sb:
        argv = ["filter-difficulty", q_uri, "--base-url", sb.base_url, "--model", "sandbox-grader"]
        argv += ["--low", "1", "--high", "10", "--out", out, "--no-progress"]
        with held_by_another_run(out, "difficulty", "00001"):
            assert main(argv) == 1
        assert one_error_line(capsys) == (
            "error: 1 of 2 difficulty shard(s) not committed: 00001 (lease held by another run); "
            "run the same command again to complete exactly those"
        )
        assert main(argv) == 0
    assert errors(capsys.readouterr().err) == []
