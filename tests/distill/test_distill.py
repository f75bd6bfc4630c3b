"""The distillation engine against the fault-injecting sandbox teacher on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from octomed_data import storage
from octomed_data.answers import METHODS
from octomed_data.distill import distill_shard, estimate, is_shard_done, read_done_keys
from octomed_data.inference.ratelimit import LocalRateLimiter, WindowBudget
from octomed_data.prompts import build_messages
from octomed_data.sandbox import (
    SANDBOX_MARK,
    FaultConfig,
    answer_for,
    max_in_window,
    prompt_text,
    start_sandbox,
)
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, question_row
from octomed_data.stages.distill_run import finalize, run_local
from tests.support.distill import KEY, config, make_questions, read_raw


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


ALL_FAULTS = FaultConfig(
    seed=7,
    rate_limited=0.08,
    retry_after_s=0.05,
    server_error=0.08,
    dropped=0.05,
    slow=0.04,
    slow_s=1.5,
    malformed=0.05,
    truncated=0.05,
    refusal=0.05,
)


def test_faults_every_question_gets_exactly_n_verified_samples(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, 40)
    with start_sandbox(faults=ALL_FAULTS, style="mixed") as sb:
        cfg = config(sb.base_url, teacher={"timeout_s": 0.75})
        report = distill_shard(q_uri, "00000", out, cfg)
        stats = sb.stats()
    assert report.complete and report.failed == 0
    assert report.expected == report.new_samples == report.stored == 160
    faults = Counter(r["fault"] for r in stats["log"])
    for name in ("rate_limited", "server_error", "dropped", "slow", "malformed"):
        assert faults[name] > 0, faults
    assert report.requests == stats["requests"] == 160 + sum(v for k, v in faults.items() if k)
    # Retry-After (0.05 s) is honoured: the engine's own backoff here would be ~0.01 s.
    last: dict[str, dict] = {}
    gaps = []
    for e in stats["log"]:
        prev = last.get(e["key"])
        if prev is not None and prev["fault"] == "rate_limited":
            gaps.append(e["t"] - prev["t"])
        last[e["key"]] = e
    assert gaps and min(gaps) >= 0.045, sorted(gaps)[:5]
    rows = read_raw(out, q_uri)
    assert len(rows) == 160
    keys = Counter((r["question_id"], r["sample_idx"]) for r in rows)
    assert set(keys.values()) == {1}
    by_q = Counter(r["question_id"] for r in rows)
    assert by_q == {q["question_id"]: 4 for q in questions}
    # Extraction is right: recompute the label the sandbox chose for each sample.
    gold = {q["question_id"]: q for q in questions}
    reasons: Counter[str] = Counter()
    for r in rows:
        q = gold[r["question_id"]]
        assert r["teacher"] == "sandbox"
        reasons[r["reject_reason"]] += 1
        if r["reject_reason"] == "refusal":
            assert r["extracted_answer"] is None and r["reasoning"] is None
            continue
        assert r["reasoning"].startswith(SANDBOX_MARK)
        if r["reject_reason"] == "truncated":
            assert r["finish_reason"] == "length" and r["extracted_answer"] is None
            continue
        chosen, _, _ = answer_for(prompt_text(build_messages(q)), r["seed"], 0)
        assert r["extracted_answer"] == chosen, r["response"]
        assert r["correct"] == (chosen == q["answer"])
        assert r["reject_reason"] == (None if r["correct"] else "wrong_answer")
    assert reasons["truncated"] > 0 and reasons["refusal"] > 0
    accepted = storage.Dataset(storage.join(out, "accepted"), SAMPLE_SCHEMA).read_all().to_pylist()
    assert len(accepted) == sum(r["correct"] for r in rows)
    assert 0 < len(accepted) < len(rows)
    assert is_shard_done(out, "00000", cfg)
    # The same command again sends nothing: every sample is stored.
    with start_sandbox() as sb2:
        again = distill_shard(q_uri, "00000", out, config(sb2.base_url))
        assert sb2.stats()["requests"] == 0
    assert again.requests == 0 and again.stored_before == 160


@pytest.mark.parametrize("style", ["reasoning_content", "think"])
def test_reasoning_styles(tmp_path: Path, style: str) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 6)
    with start_sandbox(style=style) as sb:
        report = distill_shard(q_uri, "00000", out, config(sb.base_url, samples=2))
    assert report.complete
    for r in read_raw(out, q_uri):
        assert r["reasoning"].startswith(SANDBOX_MARK)
        assert "<think>" not in r["response"] and "</think>" not in r["response"]
        assert r["extracted_answer"] is not None
        assert r["extraction_method"] in METHODS


def test_rate_limit_holds_at_the_server(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 20)
    # The server enforces the same budget and counts every request over it. The limiter's margin
    # (1.0 s, not the default 0.1 s) covers the delivery delay of a loaded machine: the server stamps a
    # request when it has read it, the limiter when it grants it.
    faults = FaultConfig(rpm=10, rpm_window_s=1.0)
    granted: list[float] = []

    class Recording(WindowBudget):
        """The limiter's own grant times (a time taken after ``acquire`` returns can be late under
        load, which would make a later window look fuller than the limiter ever let it be)."""

        def take(self, n: int, tokens_each: int, now: float) -> tuple[int, float]:
            got, wait = super().take(n, tokens_each, now)
            granted.extend([now] * got)
            return got, wait

    limiter = LocalRateLimiter({"sandbox": Recording(10, None, 1.0, margin_s=1.0)})
    with start_sandbox(faults=faults) as sb:
        cfg = config(sb.base_url, samples=2, teacher={"rpm": 10, "rate_window_s": 1.0, "max_in_flight": 32})
        report = distill_shard(q_uri, "00000", out, cfg, limiter=limiter)
        stats = sb.stats()
    assert report.complete and stats["requests"] == 40 == len(granted)
    assert max_in_window(granted, 2.0) <= 10  # the client's side: exact, whatever the load
    assert stats["violations"] == 0
    assert max_in_window([r["t"] for r in stats["log"]], 1.0) <= 10


def test_failures_are_recorded_and_a_rerun_retries_exactly_those(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 6)
    # Every second key fails forever (500), so some samples succeed and the breaker stays off.
    flaky = FaultConfig(seed=3, server_error=0.5, max_faults_per_request=10**6)
    with start_sandbox(faults=flaky) as sb:
        report = distill_shard(q_uri, "00000", out, config(sb.base_url, samples=2, max_attempts=2))
    assert not report.complete and report.aborted is None
    assert 0 < report.failed < 12 and report.stored == 12 - report.failed
    rows = read_raw(out)
    failed = {(r["question_id"], r["sample_idx"]) for r in rows if r["reject_reason"] == "request_failed"}
    assert len(failed) == report.failed
    assert all(r["error"] and "500" in r["error"] for r in rows if r["reject_reason"] == "request_failed")
    assert not is_shard_done(out, "00000")
    _, failed_keys = read_done_keys(out, "00000")
    assert len(failed_keys) == report.failed
    with start_sandbox() as sb:
        again = distill_shard(q_uri, "00000", out, config(sb.base_url, samples=2, max_attempts=2))
        retried = {(e["seed"]) for e in sb.stats()["log"]}
    assert again.complete and again.requests == report.failed
    assert retried == {r["seed"] for r in rows if r["reject_reason"] == "request_failed"}
    assert len(read_raw(out)) == 12 and is_shard_done(out, "00000")


def test_n_per_request_when_the_server_honours_it(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 5)
    with start_sandbox(faults=FaultConfig(honour_n=True)) as sb:
        report = distill_shard(q_uri, "00000", out, config(sb.base_url, teacher={"supports_n": True}))
        assert sb.stats()["requests"] == 5
    assert report.complete and len(read_raw(out)) == 20


def test_resume_with_n_per_request_after_lost_samples_and_interrupted_compaction(tmp_path: Path) -> None:
    """supports_n resume: only the missing samples are asked for (one request, n = missing),
    a journal holding a sample twice still compacts to exactly N per question, and a shard whose
    compaction was interrupted (no done marker, stale raw shard) is rebuilt from the journal."""
    from octomed_data.distill.journal import iter_journal, segment_uris

    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, 5)
    cfg_over = {"teacher": {"supports_n": True}}
    with start_sandbox(faults=FaultConfig(honour_n=True)) as sb:
        # The journal is kept (not retired after compaction) so that it can be doctored below.
        first = distill_shard(q_uri, "00000", out, config(sb.base_url, **cfg_over), journal="keep")
    assert first.complete
    rows = list(iter_journal(out, "00000"))
    lost_q = questions[0]["question_id"]
    # Samples 1 and 3 of one question never became durable; every other row is journalled twice.
    kept = [r for r in rows if not (r["question_id"] == lost_q and r["sample_idx"] in (1, 3))]
    for uri in segment_uris(out, "00000"):
        os.remove(uri)
    journal = storage.join(out, "_journal", "00000")
    for name in ("00000000000000000001-a.jsonl", "00000000000000000002-b.jsonl"):
        data = "".join(json.dumps(r) + "\n" for r in kept)
        storage.write_bytes(storage.join(journal, name), data.encode())
    # Killed mid-compaction: the raw file exists, its marker (the done-signal) does not.
    os.remove(storage.Dataset(storage.join(out, "raw")).marker_uri("00000"))
    with start_sandbox(faults=FaultConfig(honour_n=True)) as sb:
        again = distill_shard(q_uri, "00000", out, config(sb.base_url, **cfg_over))
        log = sb.stats()["log"]
    assert [e["n"] for e in log] == [2] and again.requests == 1
    assert again.stored_before == 18 and again.new_samples == 2 and again.complete
    final = read_raw(out)
    assert len(final) == 20
    assert set(Counter((r["question_id"], r["sample_idx"]) for r in final).values()) == {1}
    assert Counter(r["question_id"] for r in final) == {q["question_id"]: 4 for q in questions}
    before = {(r["question_id"], r["sample_idx"]): r["response"] for r in kept}
    assert all(
        before[(r["question_id"], r["sample_idx"])] == r["response"]
        for r in final
        if r["question_id"] != lost_q
    )


class _TrickleServer:
    """Sends headers at once, then the body one byte every 0.1 s: each read is quick, the reply slow."""

    def __init__(self) -> None:
        from octomed_data.sandbox import SandboxHandle

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            for _ in range(60):
                await resp.write(b" ")  # leading whitespace is valid JSON padding
                await asyncio.sleep(0.1)
            await resp.write(b"{}")
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        self.handle = SandboxHandle(app, "127.0.0.1").start(0)


def test_timeout_bounds_the_whole_request_not_each_read(tmp_path: Path) -> None:
    q_uri = str(tmp_path / "q")
    make_questions(q_uri, 1)
    server = _TrickleServer()
    try:
        cfg = config(server.handle.base_url, samples=1, max_attempts=1, teacher={"timeout_s": 0.5})
        started = time.monotonic()
        report = distill_shard(q_uri, "00000", str(tmp_path / "out"), cfg)
        elapsed = time.monotonic() - started
    finally:
        server.handle.stop()
    assert report.failed == 1 and not report.complete
    assert elapsed < 3.0, elapsed  # the reply would take 6 s
    assert read_raw(str(tmp_path / "out"))[0]["error"] == "request timed out"


class _EchoKeyServer:
    """Answers 401 quoting the bearer key, as some providers do: the key must still not leak."""

    def __init__(self) -> None:
        from octomed_data.sandbox import SandboxHandle

        async def handler(request: web.Request) -> web.Response:
            auth = request.headers.get("Authorization", "")
            msg = f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"
            return web.json_response({"error": {"message": msg}}, status=401)

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        self.handle = SandboxHandle(app, "127.0.0.1").start(0)


def _grep_tree(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p))
        if p.suffix == ".parquet":
            text = json.dumps(pq.read_table(p).to_pylist(), default=str)
            if needle in text:
                hits.append(str(p))
    return hits


def test_api_key_never_reaches_parquet_logs_or_reprs(tmp_path: Path, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)
    q_uri = str(tmp_path / "q")
    make_questions(q_uri, 3)
    with start_sandbox(faults=ALL_FAULTS) as sb:
        cfg = config(sb.base_url, samples=2)
        run_local(q_uri, str(tmp_path / "ok"), cfg, progress=True)
    echo = _EchoKeyServer()
    try:
        report = distill_shard(q_uri, "00000", str(tmp_path / "bad"), config(echo.handle.base_url, samples=2))
    finally:
        echo.handle.stop()
    assert report.failed == 6
    errors = [r["error"] for r in read_raw(str(tmp_path / "bad"))]
    assert all("401" in e for e in errors)
    assert _grep_tree(tmp_path, KEY) == []
    assert _grep_tree(tmp_path, KEY[:12]) == []
    captured = capsys.readouterr()
    assert KEY not in caplog.text + captured.out + captured.err
    assert KEY not in repr(cfg) and KEY not in json.dumps(cfg.public_dict())


def test_output_on_s3_and_finalize(tmp_path: Path, s3_bucket: str) -> None:
    q_uri, out = str(tmp_path / "q"), f"{s3_bucket}/distill"
    make_questions(q_uri, 8, shard="00000")
    make_questions(q_uri, 8, shard="00001", source="medmcqa", offset=100)
    with start_sandbox(faults=FaultConfig(seed=2, truncated=0.1)) as sb:
        cfg = config(
            sb.base_url,
            teacher={"price_prompt_per_1m": 0.55, "price_completion_per_1m": 2.19},
        )
        summary = run_local(q_uri, out, cfg, progress=False)
    assert summary["complete"] and summary["stored"] == 64
    assert is_shard_done(out, "00000", cfg) and is_shard_done(out, "00001", cfg)
    stats = storage.read_json(storage.join(out, "stats.json"))
    assert set(stats["sources"]) == {"medqa", "medmcqa"}
    for s in stats["sources"].values():
        assert s["samples"] == 32 and s["questions"] == 8
        assert s["questions_with_accepted"] + s["questions_without_accepted"] == 8
    cost = storage.read_json(storage.join(out, "cost.json"))
    assert cost["total_prompt_tokens"] > 0 and cost["total_usd"] > 0
    row = cost["by_teacher_source"][0]
    expected = (row["prompt_tokens"] * 0.55 + row["completion_tokens"] * 2.19) / 1e6
    assert row["cost_usd"] == pytest.approx(expected, abs=1e-8)
    again = finalize(out, q_uri)
    assert again["stats"] == stats


def test_multimodal_question_sends_image_as_data_url(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    uri = str(tmp_path / "img.png")
    storage.write_bytes(uri, buf.getvalue())
    row = question_row(
        source="vqa",
        split="train",
        task_type="mm_mcq",
        question="What colour dominates?",
        answer="A",
        input_file="x",
        record_index=0,
        options={"A": "red", "B": "blue"},
        images=[{"sha256": "0" * 64, "uri": uri, "phash": 0, "width": 8, "height": 8}],
    )
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    storage.Dataset(q_uri, QUESTION_SCHEMA).write_shard("00000", [row])
    msgs = build_messages(row)
    assert msgs[1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    with start_sandbox() as sb:
        cfg = config(sb.base_url, samples=2, teacher={"modalities": ["text", "image"]})
        report = distill_shard(q_uri, "00000", out, cfg)
    assert report.complete and report.stored == 2


def test_estimate_projects_cost_and_duration(tmp_path: Path) -> None:
    q_uri = str(tmp_path / "q")
    make_questions(q_uri, 30)
    with start_sandbox(latency_s=0.01) as sb:
        cfg = config(
            sb.base_url,
            samples=16,
            teacher={"price_prompt_per_1m": 1.0, "price_completion_per_1m": 4.0, "rpm": 600},
        )
        result = estimate(q_uri, cfg, sample_questions=5, samples_per_question=2)
        assert sb.stats()["requests"] == 10
    t = result["teachers"]["sandbox"]
    assert t["questions"] == 30 and t["samples"] == 480 and t["requests"] == 480
    assert t["cost_usd"] >= 0 and result["total_cost_usd"] == pytest.approx(t["cost_usd"], abs=0.01)
    assert t["duration_s"] == pytest.approx(480 / 600 * 60, rel=0.01) and t["bound_by"] == "rpm"


def test_questions_shard_missing_is_a_clear_error(tmp_path: Path) -> None:
    from octomed_data.errors import OctomedError

    q_uri = str(tmp_path / "q")
    make_questions(q_uri, 2)
    with pytest.raises(OctomedError, match="not committed"):
        distill_shard(q_uri, "00042", str(tmp_path / "out"), config("http://127.0.0.1:9/v1"))


def test_thread_count_returns_to_baseline(tmp_path: Path) -> None:
    """The engine leaves no threads or servers behind (sandbox stopped, clients closed)."""
    before = threading.active_count()
    q_uri = str(tmp_path / "q")
    make_questions(q_uri, 2)
    with start_sandbox() as sb:
        distill_shard(q_uri, "00000", str(tmp_path / "out"), config(sb.base_url, samples=1))
    assert threading.active_count() <= before + 1  # asyncio.to_thread's default pool may linger
    assert os.environ["OPENAI_API_KEY"] == KEY


def test_rate_window_spans_the_shards_of_a_local_run(tmp_path: Path) -> None:
    """Shards run one after another share each teacher's window: shard 2 does not start a fresh budget."""
    from octomed_data.stages.distill_run import run_local

    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 8, shard="00000")
    make_questions(q_uri, 8, shard="00001", offset=8)
    faults = FaultConfig(rpm=10, rpm_window_s=2.0)
    with start_sandbox(faults=faults) as sb:
        cfg = config(sb.base_url, samples=1, teacher={"rpm": 10, "rate_window_s": 2.0, "max_in_flight": 32})
        summary = run_local(q_uri, out, cfg, progress=False)
        stats = sb.stats()
    assert summary["complete"] and stats["requests"] == 16
    assert stats["violations"] == 0
    assert max_in_window([r["t"] for r in stats["log"]], 2.0) <= 10


def test_recommitted_questions_make_the_shard_stale_and_cost_only_the_new_ones(tmp_path: Path) -> None:
    """Questions re-decontaminated (one removed, one added): the shard is not done any more; a re-run
    requests exactly the new question's samples and drops the removed one's."""
    from octomed_data.stages.distill_run import run_local

    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, 5)
    with start_sandbox() as sb:
        cfg = config(sb.base_url, samples=2)
        run_local(q_uri, out, cfg, progress=False)
        assert is_shard_done(out, "00000", cfg, q_uri)
        replaced = questions[1:] + make_questions(str(tmp_path / "extra"), 1, offset=50)
        storage.Dataset(q_uri, QUESTION_SCHEMA).write_shard("00000", replaced)
        assert not is_shard_done(out, "00000", cfg, q_uri)
        before = sb.stats()["requests"]
        summary = run_local(q_uri, out, cfg, progress=False)
        assert sb.stats()["requests"] - before == 2  # the new question's two samples only
    assert summary["complete"]
    rows = read_raw(out)
    assert Counter(r["question_id"] for r in rows) == {q["question_id"]: 2 for q in replaced}
    assert is_shard_done(out, "00000", cfg, q_uri)
