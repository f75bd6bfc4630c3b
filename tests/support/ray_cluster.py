"""Raylets started by hand on loopback for the two-node cluster tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


KEY_ENV = "OCTOMED_REAL_TEST_KEY"


def node_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV and not k.startswith("RAY_ADDRESS")}
    repo = str(Path(__file__).resolve().parents[2])
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        OCTOMED_SHARD_LEASE_TTL_S="3",
        PYTHONPATH=repo + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def stop_own_raylets(temp: str) -> None:
    """Kill only this cluster's processes (every one runs under its own --temp-dir), never another
    Ray on the machine (``ray stop --force`` would kill them all, a CI neighbour's included)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
