"""tests/run_tiers.py's stop(): a tier is asked to stop with SIGINT first, so pytest tears its
fixtures (and the servers they started) down; one that ignores it is still stopped."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

# The script under test (not a helper module): loaded from its file.
_spec = importlib.util.spec_from_file_location("run_tiers", Path(__file__).resolve().parent / "run_tiers.py")
run_tiers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_tiers)
stop = run_tiers.stop

# A stand-in for pytest: on SIGINT it "tears down" (writes a file) and exits, as a fixture's
# teardown runs on KeyboardInterrupt; with "ignore" it ignores SIGINT and SIGTERM alike.
CHILD = """
import signal, sys, time
out, mode = sys.argv[1], sys.argv[2]
if mode == "ignore":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(out + ".ready", "w").close()
try:
    time.sleep(120)
except KeyboardInterrupt:
    open(out, "w").write("torn down")
"""


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / f"{mode}.txt"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), mode], process_group=0)
    deadline = time.monotonic() + 30
    while not Path(str(out) + ".ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc, out


def test_stop_sends_sigint_first_so_the_tier_tears_down(tmp_path) -> None:
    proc, out = _start(tmp_path, "teardown")
    stop(proc)
    assert proc.returncode == 0 and out.read_text() == "torn down"


def test_stop_still_kills_a_tier_that_ignores_sigint_and_sigterm(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(run_tiers, "STOP_WAITS_S", (0.5, 0.5))
    proc, out = _start(tmp_path, "ignore")
    t0 = time.monotonic()
    stop(proc)
    assert proc.returncode == -9 and not out.exists() and time.monotonic() - t0 < 10


def test_cpu_time_of_a_test_counts_the_processes_it_started(tmp_path) -> None:
    """tests/support/cputime.py (OCTOMED_TEST_CPU): a child's CPU, reaped or still running, is counted."""
    import json
    import subprocess
    import sys
    import time

    from tests.support.cputime import TICK, CpuRecorder, processes

    recorder = CpuRecorder(str(tmp_path))
    started = recorder.start()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    subprocess.run([sys.executable, "-c", burn], check=True)  # reaped: its time is in our cutime
    live = subprocess.Popen([sys.executable, "-c", burn + "import time; time.sleep(30)"])
    try:
        while True:  # until the running child has burnt its 0.6 s
            if processes()[live.pid][2] / TICK >= 0.6:
                break
            time.sleep(0.05)  # this process itself stays nearly idle
        recorder.finish("x::y", started)
    finally:
        live.kill()
        live.wait()
    (line,) = [json.loads(x) for x in recorder.path.read_text().splitlines()]
    assert line["test"] == "x::y" and line["cpu_s"] >= 1.2 - 0.1, line
