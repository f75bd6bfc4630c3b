"""Both test tiers at once, as .ci/run runs them: ``python tests/run_tiers.py [pytest args...]``.

The real tier (``-m real``: Prefect, Ray, the S3 server, vLLM, DeepSpeed, the CLI as a process) mostly
waits on servers and subprocesses: on 2 cores it leaves most of a core idle for its ~15 minutes. The
fast tier (``-m "not real"``: the library, no servers) runs in that idle time instead of before it.
The fast tier's output is shown as it runs, so a logic failure still shows in minutes; a failing
fast tier stops the real tier at once. Then the real tier's output follows, live. The exit status
is 0 only when both tiers passed; each tier's wall time is printed at the end.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_TESTS = 5  # pytest's exit status when a selection holds no test of a tier
STOP_WAITS_S = (60.0, 30.0)  # how long a stopped tier has after SIGINT, then after SIGTERM
FAST = ["-m", "not real", "-n", "2"]
# --no-loadscope-reorder: files in collection order (tests/support/tiers.py SLOW_FILES first), not
# sorted by their number of tests, so the longest files start first.
# --durations: the slowest real tests named at the end of every CI log (where its time goes).
REAL = ["-m", "real", "-n", "3", "--dist", "loadfile", "--no-loadscope-reorder", "--durations=20"]


def pytest(args: list[str], extra: list[str], tier: str, **kw) -> subprocess.Popen:
    # OCTOMED_TIER_REPORTS=<folder>: each tier's per-test times as JUnit XML (<folder>/<tier>.xml),
    # to see where a CI run's time went (SLOW_FILES in tests/support/tiers.py is measured this way).
    reports = os.environ.get("OCTOMED_TIER_REPORTS")
    junit = [f"--junitxml={Path(reports, tier + '.xml')}"] if reports else []
    cmd = [sys.executable, "-m", "pytest", "-q", *args, *junit, *extra]
    print("$", shlex.join(cmd), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, **kw)


def stop(proc: subprocess.Popen) -> None:
    """The tier's whole process group (pytest, its workers and the servers they started): SIGINT
    first, so pytest tears its fixtures down (servers started in a session of their own, such as
    PostgreSQL or a Prefect server, outlive a SIGTERM to this group), then SIGTERM, then SIGKILL."""
    waits = (*STOP_WAITS_S, None)
    for sig, wait_s in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), waits, strict=True):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def follow(path: Path, proc: subprocess.Popen) -> None:
    """Print ``path`` from its start until ``proc`` ends and everything it wrote is shown."""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            elif proc.poll() is not None:
                rest = fh.read()
                sys.stdout.buffer.write(rest)
                sys.stdout.flush()
                return
            else:
                time.sleep(0.5)


def main(extra: list[str]) -> int:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="octomed-real-tier-") as tmp:
        log = Path(tmp) / "real.log"
        with open(log, "wb") as out:
            # Its own process group, so that stopping it stops the servers its workers started.
            real = pytest(REAL, extra, "real", stdout=out, stderr=subprocess.STDOUT, process_group=0)
        fast = None
        try:
            fast = pytest(FAST, extra, "fast")
            fast_rc = fast.wait()
            fast_s = time.monotonic() - t0
            print(f"fast tier: exit {fast_rc} after {fast_s / 60:.1f} min", flush=True)
            if fast_rc != 0 and not (extra and fast_rc == NO_TESTS):
                print("fast tier failed: the real tier is stopped", flush=True)
                stop(real)
                return fast_rc
            print("real tier (started with the fast tier), its output so far and to the end:", flush=True)
            follow(log, real)
            real_rc = real.wait()
        finally:
            if fast is not None and fast.poll() is None:
                fast.terminate()
                fast.wait()
            stop(real)
    real_s = time.monotonic() - t0
    print(
        f"fast tier: {fast_s / 60:.1f} min; real tier: exit {real_rc} after {real_s / 60:.1f} min", flush=True
    )
    # A selection (extra args) of one tier's tests only; the whole suite must run both tiers.
    if extra and NO_TESTS in (fast_rc, real_rc) and {fast_rc, real_rc} <= {0, NO_TESTS}:
        return 0 if 0 in (fast_rc, real_rc) else NO_TESTS  # a selection of one tier's tests only
    return real_rc


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped CI job stops both tiers
    sys.exit(main(sys.argv[1:]))
