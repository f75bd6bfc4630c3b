"""The main job on a busy machine: ``octomed-data demo`` (its own embedded Prefect API and local Ray)
passes with two CPU-bound processes running beside it on a 2-core machine.

Before, the demo died at the embedded Prefect API's 20 s start limit ("Timed out while attempting
to connect to ephemeral Prefect API server"), and a local Ray that missed Ray's 30 s raylet wait
("The current node timed out during startup") failed the run with no retry (flows/startup.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
BURNERS = 2


@pytest.mark.real
def test_demo_passes_beside_two_cpu_burners(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "OCTOMED_STORE"}
    env |= {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    burn = [sys.executable, "-c", "while True: pass"]
    burners = [subprocess.Popen(burn, start_new_session=True) for _ in range(BURNERS)]
    t0 = time.time()
    try:
        time.sleep(1.0)  # the burners own the cores before the demo starts
        proc = subprocess.run(
            [str(BIN / "octomed-data"), "demo", "--store", str(tmp_path / "store")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        alive = [b.poll() is None for b in burners]
    finally:
        for b in burners:
            b.kill()
            b.wait()
    out = proc.stdout + proc.stderr
    assert alive == [True] * BURNERS  # the load was there for the whole demo
    assert proc.returncode == 0, out[-6000:]
    assert "finished; everything is under" in out and "Traceback" not in out, out[-6000:]
    runs = list((tmp_path / "store" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "report" / "report.md").exists()
    print(f"demo beside {BURNERS} CPU burners: {time.time() - t0:.0f} s")
