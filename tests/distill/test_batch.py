"""Batch mode end to end: the distill stage and the CLI against the sandbox's Files + Batch API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from octomed_data import storage
from octomed_data.distill import config_fingerprint
from octomed_data.distill.batch import SUBMITTED, batch_dir, read_records
from octomed_data.inference.client import sample_seed
from octomed_data.layout import RunPaths
from octomed_data.report import shard_table_rows
from octomed_data.runs import shard_states
from octomed_data.sandbox import BatchConfig, FaultConfig, start_sandbox
from octomed_data.schema import SAMPLE_SCHEMA
from octomed_data.stages.distill_run import run_local
from octomed_data.teachers import DistillConfig
from tests.support.distill import config, make_questions

KEY = "sk-test-batch-SECRET-7d21c"
N = 4
PRICES = {"price_prompt_per_1m": 2.5, "price_completion_per_1m": 10.0}
# What the online and the batch path both store identically for the same sample.
SAME = ("question_id", "sample_idx", "seed", "teacher", "model", "params_hash", "reasoning", "response")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _raw(out: str) -> list[dict]:
    return storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_all().to_pylist()


def _usd(rows: list[dict], factor: float) -> float:
    p = sum(r["prompt_tokens"] or 0 for r in rows)
    c = sum(r["completion_tokens"] or 0 for r in rows)
    return (p * PRICES["price_prompt_per_1m"] + c * PRICES["price_completion_per_1m"]) / 1e6 * factor


def test_mode_changes_neither_sample_keys_nor_the_fingerprint() -> None:
    online = config("http://127.0.0.1:1/v1")
    batch = config("http://127.0.0.1:1/v1", teacher={"mode": "batch", "batch_poll_s": 1})
    assert batch.teachers[0].params_hash() == online.teachers[0].params_hash()
    assert config_fingerprint(batch) == config_fingerprint(online)
    with pytest.raises(Exception, match="mode"):
        config("http://127.0.0.1:1/v1", teacher={"mode": "offline"})


def test_batch_stage_stores_the_same_samples_as_online_at_the_batch_price(tmp_path: Path) -> None:
    q_uri = str(tmp_path / "q")
    questions = make_questions(q_uri, 40)
    with start_sandbox(batch=BatchConfig(complete_after_s=0.3)) as sb:
        teacher = {"mode": "batch", "batch_poll_s": 0.05, "batch_max_requests": 64, **PRICES}
        cfg = config(sb.base_url, teacher=teacher)
        out = str(tmp_path / "batch")
        summary = run_local(q_uri, out, cfg, progress=False)
        batch_stats, chat = sb.batch_stats(), sb.stats()
        online_out = str(tmp_path / "online")
        run_local(q_uri, online_out, config(sb.base_url, teacher=PRICES), progress=False)
    assert summary["complete"] and summary["stored"] == 40 * N
    # 160 requests, at most 64 per batch: three batches, every request run once, none online.
    assert batch_stats["creations"] == 3 and batch_stats["uploads"] == 3
    assert batch_stats["executed"] == 40 * N and chat["requests"] == 0
    rows = _raw(out)
    assert Counter(r["question_id"] for r in rows) == {q["question_id"]: N for q in questions}
    assert set(Counter((r["question_id"], r["sample_idx"]) for r in rows).values()) == {1}
    ids = {b["id"] for b in batch_stats["batches"]}
    per_batch = Counter(r["batch_id"] for r in rows)
    assert set(per_batch) == ids and sorted(per_batch.values()) == [32, 64, 64]
    # The same sample whichever way it was requested (the sandbox answers from prompt + seed).
    online = {(r["question_id"], r["sample_idx"]): r for r in _raw(online_out)}
    for r in rows:
        o = online[(r["question_id"], r["sample_idx"])]
        assert {k: r[k] for k in SAME} == {k: o[k] for k in SAME}
        assert o["batch_id"] is None and r["latency_s"] is None and r["reject_reason"] is None
    # Cost at half the online price, and the ledger says how much came from batches.
    cost = storage.read_json(storage.join(out, "cost.json"))
    assert cost["total_usd"] == pytest.approx(_usd(rows, 0.5), abs=1e-8)
    online_cost = storage.read_json(storage.join(online_out, "cost.json"))
    assert online_cost["total_usd"] == pytest.approx(2 * cost["total_usd"], abs=1e-8)
    assert cost["by_teacher_source"][0]["batch_samples"] == 40 * N
    # The shard's attempt record (the shard table in the UI) shows its batches.
    state = storage.read_json(RunPaths.at(out).state_uri("distill", "00000"))
    assert state["batch"] == "completed 3/3" and state["batch_samples"] == 40 * N
    (row,) = shard_table_rows(shard_states(RunPaths.at(out), "distill"))
    assert row["batch"] == "completed 3/3" and row["state"] == "COMPLETED"
    assert "batch" not in shard_table_rows([{"stage": "ingest", "shard": "a"}])[0]  # only where used
    # Every batch record is journalled with its id and marked collected.
    records = read_records(out, "00000")
    assert {r["batch_id"] for r in records} == ids and {r["state"] for r in records} == {"collected"}


@pytest.mark.parametrize("supports_n", [False, True])
def test_expiry_and_failed_requests_fall_back_online_for_exactly_the_missing_samples(
    tmp_path: Path, supports_n: bool
) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, 40)
    requests = 40 if supports_n else 40 * N
    expire_after = requests * 5 // 8
    behaviour = BatchConfig(complete_after_s=0.1, expire_after=expire_after, error_rate=0.15, seed=3)
    with start_sandbox(batch=behaviour, faults=FaultConfig(honour_n=supports_n)) as sb:
        teacher = {"mode": "batch", "batch_poll_s": 0.05, "supports_n": supports_n, **PRICES}
        summary = run_local(q_uri, out, config(sb.base_url, teacher=teacher), progress=False)
        (batch,) = sb.batch_stats()["batches"]
        online_log = sb.stats()["log"]
    assert batch["status"] == "expired"
    counts = batch["request_counts"]
    errors = counts["failed"] - (requests - expire_after)
    assert counts["completed"] + counts["failed"] == requests and errors > 0
    assert summary["complete"] and summary["stored"] == 40 * N
    rows = _raw(out)
    assert Counter(r["question_id"] for r in rows) == {q["question_id"]: N for q in questions}
    assert set(Counter((r["question_id"], r["sample_idx"]) for r in rows).values()) == {1}
    from_batch = [r for r in rows if r["batch_id"] == batch["id"]]
    online = [r for r in rows if r["batch_id"] is None]
    per_request = N if supports_n else 1
    assert len(from_batch) == counts["completed"] * per_request
    assert len(online) == counts["failed"] * per_request
    # Online: exactly one request per sample group the batch did not answer, nothing else.
    assert len(online_log) == counts["failed"]
    assert sorted(e["seed"] for e in online_log) == sorted({r["seed"] for r in online})
    if supports_n:
        assert {e["n"] for e in online_log} == {N}
    assert not {e["seed"] for e in online_log} & {r["seed"] for r in from_batch}
    # Batch samples at the batch price, the fallback at the online price.
    cost = storage.read_json(storage.join(out, "cost.json"))
    assert cost["total_usd"] == pytest.approx(_usd(from_batch, 0.5) + _usd(online, 1.0), abs=1e-8)
    state = storage.read_json(RunPaths.at(out).state_uri("distill", "00000"))
    assert state["batch"] == "expired 1/1" and state["batch_fallback"] == len(online)


def _write_config(path: Path, base_url: str) -> str:
    teacher = {
        "name": "sandbox",
        "base_url": base_url,
        "model": "sandbox-r1",
        "max_in_flight": 8,
        "mode": "batch",
        "batch_poll_s": 0.1,
        "batch_max_requests": 80,
        **PRICES,
    }
    data = {"teachers": [teacher], "samples": N, "flush_interval_s": 0.05, "backoff_base_s": 0.05}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _command(q_uri: str, out: str, cfg: str) -> list[str]:
    cli = [sys.executable, "-m", "cli", "distill", q_uri, "--config", cfg]
    return [*cli, "--executor", "local", "--no-progress", "--out", out]


def test_kill_9_between_submit_and_collect_collects_the_same_batches(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, 40)
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with start_sandbox(batch=BatchConfig(hold=True)) as sb:
        cfg = _write_config(tmp_path / "cfg.yaml", sb.base_url)
        cmd = _command(q_uri, out, cfg)
        first_log = tmp_path / "first.log"
        with first_log.open("wb") as log:
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            state_uri = RunPaths.at(out).state_uri("distill", "00000")
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and proc.poll() is None:
                # Submitted, journalled, and shown on the shard's record: now it only polls.
                state = storage.read_json(state_uri) if storage.exists(state_uri) else {}
                if state.get("batch") == "in_progress 2/2":
                    break
                time.sleep(0.05)
            assert proc.poll() is None, first_log.read_text()[-2000:]
            assert state.get("batch") == "in_progress 2/2", state
            os.killpg(proc.pid, signal.SIGKILL)  # after submit, before collect: no clean-up at all
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        before = sb.batch_stats()
        assert before["creations"] == 2 and before["executed"] == 0
        records = read_records(out, "00000")
        assert [r["state"] for r in records] == [SUBMITTED, SUBMITTED]
        ids = {r["batch_id"] for r in records}
        assert ids == {b["id"] for b in before["batches"]}
        # As if the kill had come while the second create call was on the wire: its record says
        # "submitting" with no batch id. The restart must find that batch, not create another.
        lost = dict(records[1], state="submitting", batch_id=None, status=None)
        storage.write_json(storage.join(batch_dir(out, "00000"), f"{lost['name']}.json"), lost)
        sb.batch_control(hold=False)  # the provider finishes the batches while nobody watches
        final = subprocess.run(cmd, env=env, capture_output=True, timeout=180)
        assert final.returncode == 0, final.stderr.decode()[-3000:]
        after = sb.batch_stats()
        chat = sb.stats()
    # The same two batches were collected: no second batch, no online request, nothing paid twice.
    assert after["creations"] == 2 and after["uploads"] == 2 and after["lists"] >= 1
    assert after["executed"] == 40 * N and chat["requests"] == 0
    rows = _raw(out)
    assert len(rows) == 40 * N and {r["batch_id"] for r in rows} == ids
    assert Counter(r["question_id"] for r in rows) == {q["question_id"]: N for q in questions}
    assert set(Counter((r["question_id"], r["sample_idx"]) for r in rows).values()) == {1}
    assert {r["seed"] for r in rows} == {
        sample_seed(0, q["question_id"], i) for q in questions for i in range(N)
    }
    assert {r["batch_id"] for r in read_records(out, "00000")} == ids
    cost = storage.read_json(storage.join(out, "cost.json"))
    assert cost["total_usd"] == pytest.approx(_usd(rows, 0.5), abs=1e-8)
    state = storage.read_json(RunPaths.at(out).state_uri("distill", "00000"))
    assert state["state"] == "COMPLETED" and state["batch"] == "completed 2/2"
    # The key reached neither the logs, nor the batch records, nor the run's config.
    assert KEY.encode() not in first_log.read_bytes() + final.stdout + final.stderr
    for path in Path(out).rglob("*.json"):
        assert KEY not in path.read_text()
    assert DistillConfig.from_yaml(cfg).teachers[0].mode == "batch"


def test_estimate_probes_online_and_prices_batch_teachers_at_the_batch_price(tmp_path: Path) -> None:
    from octomed_data.distill import estimate

    q_uri = str(tmp_path / "q")
    make_questions(q_uri, 40)
    prices = {"price_prompt_per_1m": 1000.0, "price_completion_per_1m": 4000.0}
    with start_sandbox(batch=BatchConfig(hold=True)) as sb:
        batch = estimate(q_uri, config(sb.base_url, teacher={"mode": "batch", **prices}), sample_questions=5)
        online = estimate(q_uri, config(sb.base_url, teacher=prices), sample_questions=5)
        assert sb.batch_stats()["creations"] == 0  # a held batch would never have answered
    t_batch, t_online = batch["teachers"]["sandbox"], online["teachers"]["sandbox"]
    assert t_batch["mode"] == "batch" and t_batch["samples"] == 40 * N
    assert t_online["cost_usd"] > 1 and t_batch["cost_usd"] == pytest.approx(
        t_online["cost_usd"] / 2, abs=0.01
    )


def test_a_lost_create_answer_and_429s_never_make_a_second_batch(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, 10)
    # The first create makes the batch and answers 500; the first three API calls answer 429.
    behaviour = BatchConfig(lose_create_replies=1, rate_limit_first=3)
    with start_sandbox(batch=behaviour) as sb:
        teacher = {"mode": "batch", "batch_poll_s": 0.05, **PRICES}
        summary = run_local(q_uri, out, config(sb.base_url, teacher=teacher), progress=False)
        stats, chat = sb.batch_stats(), sb.stats()
    assert summary["complete"] and chat["requests"] == 0
    assert stats["rate_limited"] == 3 and stats["uploads"] == 1
    # The retry looked for the batch first and adopted it: one batch, paid once.
    assert stats["creations"] == 1 and stats["lists"] >= 1 and stats["executed"] == 10 * N
    (batch,) = stats["batches"]
    rows = _raw(out)
    assert {r["batch_id"] for r in rows} == {batch["id"]}
    assert Counter(r["question_id"] for r in rows) == {q["question_id"]: N for q in questions}
    assert [r["batch_id"] for r in read_records(out, "00000")] == [batch["id"]]


def test_batch_records_and_samples_on_s3_two_shards(tmp_path: Path, s3_bucket: str) -> None:
    q_uri, out = str(tmp_path / "q"), f"{s3_bucket}/distill"
    make_questions(q_uri, 8, shard="00000")
    make_questions(q_uri, 8, shard="00001", source="medmcqa", offset=100)
    with start_sandbox(batch=BatchConfig(complete_after_s=0.1)) as sb:
        teacher = {"mode": "batch", "batch_poll_s": 0.05, **PRICES}
        summary = run_local(q_uri, out, config(sb.base_url, teacher=teacher), progress=False)
        stats = sb.batch_stats()
    assert summary["complete"] and summary["stored"] == 2 * 8 * N
    # One batch per shard, journalled next to the shard's samples on the object store.
    assert stats["creations"] == 2
    for shard in ("00000", "00001"):
        (rec,) = read_records(out, shard)
        rows = storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_shard(shard).to_pylist()
        assert rec["state"] == "collected" and {r["batch_id"] for r in rows} == {rec["batch_id"]}
        assert len(rows) == 8 * N
    cost = storage.read_json(storage.join(out, "cost.json"))
    assert {r["batch_samples"] for r in cost["by_teacher_source"]} == {8 * N}


def test_a_refused_create_sends_its_samples_online_and_never_blocks_the_shard(tmp_path: Path) -> None:
    """Review finding: a create refused for good (quota, billing, a bad file) left a `submitting`
    record that every later run tried to create again, failing the shard each time."""
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, 10)
    with start_sandbox(batch=BatchConfig(refuse_create=True)) as sb:
        teacher = {"mode": "batch", "batch_poll_s": 0.05, **PRICES}
        summary = run_local(q_uri, out, config(sb.base_url, teacher=teacher), progress=False)
        stats, chat = sb.batch_stats(), sb.stats()
    assert summary["complete"] and stats["refused"] >= 1 and stats["creations"] == 0
    assert chat["requests"] == 10 * N  # every sample went online, once
    rows = _raw(out)
    assert Counter(r["question_id"] for r in rows) == {q["question_id"]: N for q in questions}
    assert {r["batch_id"] for r in rows} == {None}
    (record,) = read_records(out, "00000")
    assert record["status"] == "create_failed" and "quota" in record["error"]
    # A re-run has nothing to do and no batch to retry.
    with start_sandbox(batch=BatchConfig(refuse_create=True)) as sb:
        again = run_local(q_uri, out, config(sb.base_url, teacher=teacher), progress=False)
        assert sb.batch_stats()["refused"] == 0 and sb.stats()["requests"] == 0
    assert again["complete"]
