"""The sandbox teacher: labelled fake traces, deterministic faults, both reasoning styles."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from octomed_data.answers import extract_answer
from octomed_data.inference.replies import read_choice
from octomed_data.sandbox import SANDBOX_MARK, FaultConfig, start_sandbox
from tests.support.sandbox import OPTIONS, PROMPT, post


def test_answers_are_labelled_deterministic_and_parseable() -> None:
    with start_sandbox(style="mixed") as sb:
        seen = {}
        for seed in range(40):
            status, body, _ = post(sb.base_url, {"model": "m", "messages": PROMPT, "seed": seed})
            assert status == 200 and body["system_fingerprint"] == "octomed-sandbox"
            reply = read_choice(body["choices"][0])
            reasoning, response = reply.reasoning, reply.answer
            assert reasoning.startswith(SANDBOX_MARK)
            got = extract_answer(response, "text_mcq", OPTIONS)
            assert got.answer in {"A", "B", "C"}, response
            seen[seed] = got.answer
        again = post(sb.base_url, {"model": "m", "messages": PROMPT, "seed": 3})[1]
        assert extract_answer(read_choice(again["choices"][0]).answer, "text_mcq", OPTIONS).answer == seen[3]
    # About 1/k of the picks hit any given label: all three appear over 40 seeds.
    assert set(seen.values()) == {"A", "B", "C"}


def test_faults_are_deterministic_and_transient() -> None:
    faults = FaultConfig(seed=11, rate_limited=0.3, server_error=0.3, malformed=0.2, retry_after_s=0.25)
    runs = []
    for _ in range(2):
        with start_sandbox(faults=faults) as sb:
            outcomes = []
            for seed in range(12):
                for _attempt in range(3):  # at most max_faults_per_request (2) faults per key
                    status, body, headers = post(
                        sb.base_url, {"model": "m", "messages": PROMPT, "seed": seed}
                    )
                    outcomes.append(status if "_malformed" not in body else "malformed")
                    if status == 429:
                        assert headers["retry-after-ms"] == "250" and headers["Retry-After"] == "1"
                    if status == 200 and "_malformed" not in body:
                        break
                else:
                    pytest.fail("a request kept failing past max_faults_per_request")
            runs.append(outcomes)
    assert runs[0] == runs[1]
    assert {429, 500, "malformed", 200} <= set(runs[0])


def test_truncation_refusal_and_n() -> None:
    with start_sandbox(faults=FaultConfig(truncated=1.0), style="think") as sb:
        body = post(sb.base_url, {"model": "m", "messages": PROMPT, "seed": 1})[1]
        choice = body["choices"][0]
        assert choice["finish_reason"] == "length" and "</think>" not in choice["message"]["content"]
    with start_sandbox(faults=FaultConfig(refusal=1.0)) as sb:
        msg = post(sb.base_url, {"model": "m", "messages": PROMPT, "seed": 1})[1]["choices"][0]["message"]
        assert msg["refusal"] and "can't help" in msg["content"]
    with start_sandbox(faults=FaultConfig(honour_n=True)) as sb:
        assert len(post(sb.base_url, {"model": "m", "messages": PROMPT, "n": 3})[1]["choices"]) == 3
    with start_sandbox() as sb:  # n is ignored unless configured, like many servers
        assert len(post(sb.base_url, {"model": "m", "messages": PROMPT, "n": 3})[1]["choices"]) == 1


def test_server_side_rpm_counts_violations() -> None:
    with start_sandbox(faults=FaultConfig(rpm=3, rpm_window_s=60)) as sb:
        codes = [post(sb.base_url, {"model": "m", "messages": PROMPT, "seed": i})[0] for i in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        assert sb.stats()["violations"] == 2


def test_sandbox_teacher_command_runs_as_a_subprocess(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "sandbox-teacher", "--port", "0", "--style", "think"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("sandbox teacher listening on http://127.0.0.1:")
        base_url = line.split()[-1]
        status, body, _ = post(base_url, {"model": "m", "messages": PROMPT, "seed": 2})
        assert status == 200 and body["choices"][0]["message"]["content"].startswith("<think>" + SANDBOX_MARK)
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_sandbox/stats") as resp:
            assert json.loads(resp.read())["requests"] == 1
    finally:
        proc.terminate()
        proc.wait(10)
