"""SIGTERM (a Prefect cancel, ``kill PID``, ``docker stop``) of ``octomed-data distill``: the command
exits 143 with one line, no shard's attempt record stays RUNNING, and the same command then
completes the output exactly (issues 24, 25)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads

from octomed_data.sandbox import start_sandbox
from tests.support.distill import make_questions

ROOT = str(Path(__file__).resolve().parents[2])
SHARDS, PER_SHARD, SAMPLES = 3, 6, 2


def test_sigterm_ends_every_attempt_record_and_a_rerun_completes(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), tmp_path / "distilled"
    for s in range(SHARDS):
        make_questions(q_uri, PER_SHARD, shard=f"{s:05d}", offset=s * PER_SHARD)
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-sigterm-0000", "PYTHONPATH": ROOT}
    with start_sandbox(latency_s=0.3) as sb:
        cmd = [
            sys.executable,
            "-m",
            "cli",
            "distill",
            q_uri,
            "--base-url",
            sb.base_url,
            "--model",
            "sandbox-r1",
        ]
        cmd += ["--teacher-name", "sandbox", "--samples", str(SAMPLES), "--max-in-flight", "2"]
        cmd += ["--executor", "local", "--out", str(out), "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 90
        while time.time() < deadline and len(sb.stats()["log"]) < 4:  # mid-shard: requests answered
            time.sleep(0.05)
        assert len(sb.stats()["log"]) >= 4, "the command never reached the teacher"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, (proc.returncode, stderr[-2000:])
        assert "error: terminated (SIGTERM)" in stderr and "Traceback" not in stderr
        states = [json.loads(p.read_text()) for p in out.rglob("state/distill/*.json")]
        assert states and not [s for s in states if s["state"] == "RUNNING"], states
        assert "CANCELLED" in {s["state"] for s in states}, states  # the attempt it interrupted
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    raw = pads.dataset(str(out / "raw"), format="parquet").to_table(columns=["question_id"]).to_pylist()
    per_question = Counter(r["question_id"] for r in raw)
    assert len(per_question) == SHARDS * PER_SHARD and set(per_question.values()) == {SAMPLES}
