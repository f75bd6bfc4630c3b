"""The sandbox teacher in its own process, for benchmarks (the client's CPU is then the client's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_sandbox_process(*args: str) -> tuple[subprocess.Popen, str]:
    """``octomed-data sandbox-teacher --port 0 --no-log ARGS``; returns (process, base URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "sandbox-teacher", "--port", "0", "--no-log", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"sandbox did not start: {line!r}")
    return proc, line.split()[-1]
