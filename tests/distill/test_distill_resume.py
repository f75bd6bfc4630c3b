"""kill -9 of ``octomed-data distill`` mid-run, then the same command: nothing stored is paid twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from octomed_data import storage
from octomed_data.distill import read_done_keys
from octomed_data.distill.journal import iter_journal
from octomed_data.sandbox import FaultConfig, start_sandbox
from octomed_data.schema import SAMPLE_SCHEMA
from tests.support.distill import make_questions

KEY = "sk-test-resume-SECRET-91b3"
N = 4


def _command(q_uri: str, out: str, base_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli",
        "distill",
        q_uri,
        "--base-url",
        base_url,
        "--model",
        "sandbox-r1",
        "--teacher-name",
        "sandbox",
        "--samples",
        str(N),
        "--max-in-flight",
        "4",
        "--executor",
        "local",
        "--out",
        out,
    ]


def _stored(out: str) -> dict[str, int]:
    """key -> seed of every sample durable in the journal (what a restart must not request)."""
    return {
        f"{r['question_id']}|{r['sample_idx']}": r["seed"]
        for r in iter_journal(out, "00000")
        if r.get("reject_reason") != "request_failed"
    }


def test_kill_9_then_same_command_requests_nothing_stored(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    questions = make_questions(q_uri, 40)  # 160 samples at ~4 in flight x 0.15 s: ~6 s per full run
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    faults = FaultConfig(seed=5, server_error=0.05, rate_limited=0.05, retry_after_s=0.05)
    with start_sandbox(latency_s=0.15, faults=faults) as sb:
        cmd = _command(q_uri, out, sb.base_url)
        logs = []
        for kill_after in (25, 70):  # two kills at different points, then a run to the end
            log = open(tmp_path / f"run-{kill_after}.log", "wb")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            deadline = time.monotonic() + 60
            while len(_stored(out)) < kill_after and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert proc.poll() is None, "the run finished before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, no clean-up
            proc.wait()
            log.close()
            logs.append(tmp_path / f"run-{kill_after}.log")
            assert proc.returncode == -signal.SIGKILL
        stored_before = _stored(out)
        assert 70 <= len(stored_before) < 160
        seen_before = len(sb.stats()["log"])
        final = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
        assert final.returncode == 0, final.stderr.decode()[-2000:]
        after = sb.stats()["log"][seen_before:]
    # No request after the restart carried the seed of a sample already stored.
    stored_seeds = set(stored_before.values())
    assert not stored_seeds & {e["seed"] for e in after}
    # And the remaining samples were each requested (at least once: faults cause retries).
    assert len({e["seed"] for e in after}) == 160 - len(stored_before)
    rows = storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_all().to_pylist()
    assert len(rows) == 160
    assert set(Counter((r["question_id"], r["sample_idx"]) for r in rows).values()) == {1}
    assert Counter(r["question_id"] for r in rows) == {q["question_id"]: N for q in questions}
    done, failed = read_done_keys(out, "00000")
    assert len(done) == 160 and not failed
    # The key never reached the logs of the killed or the final runs.
    for path in logs:
        assert KEY.encode() not in path.read_bytes()
    assert KEY.encode() not in final.stdout + final.stderr
