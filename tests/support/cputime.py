"""CPU seconds per test, of the pytest process and every process it started and still holds or has
reaped (``OCTOMED_TEST_CPU=<folder>``: one JSON line per test in ``<folder>/<worker>-<pid>.jsonl``).

On a loaded CI, wall times say how long a test waited as much as what it cost; these say where the
CPU went. Processes that daemonise (re-parented away from the test process) are not counted."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def processes() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, clock ticks used by it and by the children it reaped)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        # state and ppid are fields 3 and 4 of proc(5), utime/stime/cutime/cstime fields 14-17.
        found[int(name)] = (fields[0], int(fields[1]), sum(int(x) for x in fields[11:15]))
    return found


def tree_cpu_s(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants, each with the children it reaped."""
    procs = processes()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += procs.get(pid, ("", 0, 0))[2]
        todo += children.get(pid, [])
    return total / TICK


class CpuRecorder:
    """A pytest plugin object: wraps every test's run protocol (setup, call, teardown)."""

    def __init__(self, folder: str) -> None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = Path(folder, f"{worker}-{os.getpid()}.jsonl")

    def start(self) -> tuple[float, float]:
        return tree_cpu_s(os.getpid()), time.monotonic()

    def finish(self, nodeid: str, started: tuple[float, float]) -> None:
        cpu0, t0 = started
        line = {
            "test": nodeid,
            "cpu_s": round(tree_cpu_s(os.getpid()) - cpu0, 2),
            "wall_s": round(time.monotonic() - t0, 2),
        }
        with open(self.path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
