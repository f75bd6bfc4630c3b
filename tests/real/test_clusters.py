"""Runs the two-raylet Ray cluster tests (``tests/real/cluster/``) in their own pytest process.

Those tests connect the test process to clusters they start and kill (head and worker raylets on
loopback). A process that was a driver of a cluster whose head is gone can be ended by Ray's core
worker later on, far from the test that caused it (seen in full runs: the session ended mid-run,
rc=1, output cut). Their own process keeps that away from every other test; this test fails
with the child's output when any of them fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1500)  # the subprocess's own limit: pytest-timeout's default 600 s cut it on a loaded CI
def test_ray_cluster_tests_pass_in_their_own_process(tmp_path) -> None:
    env = dict(os.environ, OCTOMED_CLUSTER_TESTS="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "tests/real/cluster"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert "3 passed" in proc.stdout, tail
