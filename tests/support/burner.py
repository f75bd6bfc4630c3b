"""A CPU burner that gives way to load already there (tests/flows/test_busy_machine.py):
``python -m tests.support.burner NEED LOG DEMO_PID_FILE``.

It burns while fewer than NEED other processes outside the demo's process tree (the demo's pid is
read from DEMO_PID_FILE once it is written) are running, and sleeps while at least that many are,
in 0.25 s slices; LOG holds the seconds burnt and yielded so far."""

from __future__ import annotations

import os
import sys
import time

from tests.support.cputime import processes

SLICE_S = 0.25


def running_others(demo: int) -> int:
    """Running processes (state R) other than this one and the demo's process tree."""
    procs = processes()

    def in_demo(pid: int) -> bool:
        while pid > 1:
            if pid == demo:
                return True
            pid = procs.get(pid, ("", 0, 0))[1]
        return False

    me = os.getpid()
    return sum(state == "R" and pid != me and not in_demo(pid) for pid, (state, _, _) in procs.items())


def main(need: int, log: str, demo_file: str) -> None:
    burnt = yielded = 0.0
    while True:
        try:
            demo = int(open(demo_file).read())
        except (OSError, ValueError):  # not started yet
            demo = -1
        busy = running_others(demo) >= need
        t0 = time.monotonic()
        if busy:
            time.sleep(SLICE_S)
            yielded += time.monotonic() - t0
        else:
            while time.monotonic() - t0 < SLICE_S:
                pass  # burn
            burnt += time.monotonic() - t0
        with open(log, "w") as fh:
            fh.write(f"{burnt:.0f} s burnt, {yielded:.0f} s yielded")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
