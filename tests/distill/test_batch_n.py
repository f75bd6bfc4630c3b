"""Batch mode against a batch endpoint that ignores ``n`` (issue 22): the samples a reply lacks
are batched again one request each, the teacher is remembered as ignoring ``n`` so later batches
are split up front, and the realised batch share, saving and cost agree with ``--estimate``."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from octomed_data import storage
from octomed_data.distill import estimate
from octomed_data.distill.batch import batch_estimate, batch_n_support, n_support_uri, read_records
from octomed_data.sandbox import BatchConfig, FaultConfig, start_sandbox
from octomed_data.schema import SAMPLE_SCHEMA
from octomed_data.stages.distill_run import run_local
from tests.support.distill import config, make_questions

KEY = "sk-test-batch-n-7f3a"
N = 4
Q = 80  # questions per shard: enough samples that the probe's lengths match the run's within ~2%
# Large prices: --estimate rounds USD to cents.
PRICES = {"price_prompt_per_1m": 1000.0, "price_completion_per_1m": 4000.0}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _teacher() -> dict:
    # The online endpoint honours n (the sandbox below does), so the run asks for n in batches too.
    return {"mode": "batch", "batch_poll_s": 0.05, "supports_n": True, **PRICES}


def test_a_batch_endpoint_ignoring_n_is_split_and_costs_what_the_estimate_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, Q, shard="00000")
    questions += make_questions(q_uri, Q, shard="00001", source="medmcqa", offset=100)
    behaviour = BatchConfig(ignore_n=True, complete_after_s=0.05)
    with start_sandbox(batch=behaviour, faults=FaultConfig(honour_n=True)) as sb:
        cfg = config(sb.base_url, teacher=_teacher(), samples=N)
        # Before any batch: n support unknown, so the estimate assumes split requests.
        before = batch_estimate(
            estimate(q_uri, cfg, sample_questions=2 * Q, samples_per_question=N, out=out), cfg, out
        )
        probe_requests = sb.stats()["requests"]
        with caplog.at_level(logging.INFO, logger="octomed_data.distill.batch"):
            summary = run_local(q_uri, out, cfg, progress=False)
        stats, online = sb.batch_stats(), sb.stats()["requests"] - probe_requests
        after = batch_estimate(
            estimate(q_uri, cfg, sample_questions=2 * Q, samples_per_question=N, out=out), cfg, out
        )
    assert summary["complete"] and summary["stored"] == 2 * Q * N and summary["failed"] == 0
    rows = storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_all().to_pylist()
    assert Counter(r["question_id"] for r in rows) == {q["question_id"]: N for q in questions}
    assert set(Counter((r["question_id"], r["sample_idx"]) for r in rows).values()) == {1}
    # Every sample came from a batch, none went online.
    assert online == 0 and all(r["batch_id"] for r in rows)
    # Shard 00000: its n-batch (Q requests, one choice each), then its Q x (N - 1) missing samples
    # in a split batch. Shard 00001: split up front (Q x N requests of one sample), no n-batch.
    assert stats["creations"] == 3 and stats["executed"] == Q + Q * (N - 1) + Q * N
    first, second = read_records(out, "00000")
    assert [len(r["samples"]) for r in first["requests"]] == [N] * Q
    assert first["collected"]["one_choice"] == Q and first["collected"]["split"] == Q * (N - 1)
    assert second["split_from"] == first["name"] and {len(r["samples"]) for r in second["requests"]} == {1}
    (third,) = read_records(out, "00001")
    assert len(third["requests"]) == Q * N and "split_from" not in third
    assert {r["state"] for r in [first, second, third]} == {"collected"}
    # Remembered per teacher, next to the batch records; one warning when it was decided.
    assert batch_n_support(out, cfg.teachers[0]) == "ignored"
    assert storage.read_json(n_support_uri(out, "sandbox"))["batch_id"] == first["batch_id"]
    decided = [r for r in caplog.records if "ignores n in batches" in r.getMessage()]
    assert [r.levelno for r in decided] == [logging.WARNING, logging.INFO]  # decided; then reused
    # Realised: batch share 100%, saving 50% vs the same tokens online.
    cost = storage.read_json(storage.join(out, "cost.json"))
    assert cost["batch_share"] == 1.0 and cost["batch_saving"] == pytest.approx(0.5, abs=1e-6)
    assert cost["total_online_usd"] == pytest.approx(2 * cost["total_usd"], rel=1e-6)
    # The estimate (unknown before the run, "ignored" after) agrees within 5%.
    for est, known in ((before, "unknown"), (after, "ignored")):
        t = est["teachers"]["sandbox"]
        assert t["batch_n"] == known and t["batch_requests"] == "one per sample"
        assert t["requests"] == 2 * Q * N
        assert abs(t["batch_share"] - cost["batch_share"]) <= 0.05
        assert abs(t["saving"] - cost["batch_saving"]) <= 0.05
        assert t["cost_usd"] == pytest.approx(cost["total_usd"], rel=0.05)
        assert t["prompt_tokens"] == pytest.approx(cost["total_prompt_tokens"], rel=0.05)


def test_an_n_ignoring_batch_answers_one_sample_per_request_and_the_rest_are_batched_again(
    tmp_path: Path,
) -> None:
    """Issue 22: such a batch answers 1/N of the samples; the other (N-1)/N went online (1,155 of
    1,232 samples, a 3% saving). Now they are batched again, nothing goes online."""
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 20)
    with start_sandbox(batch=BatchConfig(ignore_n=True), faults=FaultConfig(honour_n=True)) as sb:
        run_local(q_uri, out, config(sb.base_url, teacher=_teacher(), samples=N), progress=False)
        assert sb.stats()["requests"] == 0
    first, second = read_records(out, "00000")
    rows = storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_all().to_pylist()
    by_batch = Counter(r["batch_id"] for r in rows)
    assert by_batch == {first["batch_id"]: 20, second["batch_id"]: 20 * (N - 1)}


def test_a_batch_endpoint_honouring_n_is_remembered_and_estimated_per_question(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 10)
    with start_sandbox(batch=BatchConfig(), faults=FaultConfig(honour_n=True)) as sb:
        cfg = config(sb.base_url, teacher=_teacher(), samples=N)
        run_local(q_uri, out, cfg, progress=False)
        stats = sb.batch_stats()
        est = batch_estimate(estimate(q_uri, cfg, sample_questions=10, out=out), cfg, out)
    assert stats["creations"] == 1 and stats["executed"] == 10
    assert batch_n_support(out, cfg.teachers[0]) == "honoured"
    t = est["teachers"]["sandbox"]
    assert t["batch_n"] == "honoured" and t["requests"] == 10 and t["saving"] == pytest.approx(0.5, abs=0.01)
    # Another endpoint or model under the same name is not taken on trust.
    other = config("http://127.0.0.1:1/v1", teacher=_teacher(), samples=N)
    assert batch_n_support(out, other.teachers[0]) is None


def test_cli_states_the_simulated_cost_and_the_batch_saving(tmp_path: Path, capsys) -> None:
    """A teacher served by the sandbox with prices configured: its cost is those prices, and the
    CLI's last line says SIMULATED; --estimate says what it has seen of n in batches.

    (Named ``sandbox``: ``estimate`` measures rows by their teacher label, which sandbox rows set
    to ``sandbox``; ``tests/test_cost.py`` prices sandbox rows of a teacher named otherwise.)"""
    import yaml

    from cli import main

    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 10)
    with start_sandbox(batch=BatchConfig(ignore_n=True), faults=FaultConfig(honour_n=True)) as sb:
        teacher = {"name": "sandbox", "base_url": sb.base_url, "model": "gpt-4o", **_teacher()}
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml.safe_dump({"teachers": [teacher], "samples": N, "flush_interval_s": 0.05}))
        cli = ["distill", q_uri, "--config", str(cfg), "--out", out, "--no-progress"]
        assert main([*cli, "--executor", "local"]) == 0
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert main([*cli, "--estimate", "--estimate-questions", "10"]) == 0
        est = json.loads(capsys.readouterr().out)
    cost = storage.read_json(storage.join(out, "cost.json"))
    assert cost["simulated"] is True and cost["total_usd"] > 0 and cost["unpriced_teachers"] == []
    assert cost["by_teacher_source"][0]["priced_as"] == ["sandbox"]
    assert f"SIMULATED USD {cost['total_usd']:.4f} (batch 100% of samples, saving 50%" in line
    t = est["teachers"]["sandbox"]
    assert t["batch_n"] == "ignored" and t["requests"] == 10 * N and t["saving"] == 0.5


def test_a_run_stopped_while_its_split_batch_runs_collects_it_and_splits_nothing_twice(
    tmp_path: Path,
) -> None:
    """Stopped after the split batch was created (records still ``submitted``): the next run collects
    the n-batch again without splitting its short replies a second time, then the split batch."""
    import asyncio

    from octomed_data.distill.engine import adistill_shard

    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, 12)
    behaviour = BatchConfig(ignore_n=True, hold_after=1)  # the n-batch runs; the split batch waits
    with start_sandbox(batch=behaviour, faults=FaultConfig(honour_n=True)) as sb:
        cfg = config(sb.base_url, teacher=_teacher(), samples=N)

        async def stopped_once_split() -> None:
            task = asyncio.create_task(adistill_shard(q_uri, "00000", out, cfg))
            for _ in range(400):
                records = await asyncio.to_thread(read_records, out, "00000")
                if len(records) == 2 and records[1].get("batch_id"):
                    break
                await asyncio.sleep(0.025)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(stopped_once_split())
        first, second = read_records(out, "00000")
        assert {first["state"], second["state"]} == {"submitted"} and second["split_from"] == first["name"]
        sb.batch_control(hold_after=None)
        summary = run_local(q_uri, out, cfg, progress=False)
        stats, online = sb.batch_stats(), sb.stats()["requests"]
    assert summary["complete"] and online == 0
    # Two batches in all: the restart re-read the n-batch, and split nothing again.
    assert stats["creations"] == 2 and stats["executed"] == 12 + 12 * (N - 1)
    rows = storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_all().to_pylist()
    assert Counter(r["question_id"] for r in rows) == {q["question_id"]: N for q in questions}
    assert set(Counter((r["question_id"], r["sample_idx"]) for r in rows).values()) == {1}
    assert Counter(r["batch_id"] for r in rows) == {first["batch_id"]: 12, second["batch_id"]: 12 * (N - 1)}
    assert {r["state"] for r in read_records(out, "00000")} == {"collected"}
