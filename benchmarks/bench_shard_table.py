"""Peak memory of a run's shard table (the dashboard's card, the run report) as shards grow 10x:
records read one at a time (``shard_table``) against every record read first and then tabled (the
way it was: ``shard_table_rows(shard_states(...))``), over the same attempt records on a local store.

    .venv/bin/python benchmarks/bench_shard_table.py --shards 1000 10000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.runs import shard_states
from octomed_data.shard_table import shard_table, shard_table_csv, shard_table_rows


def seed(paths: RunPaths, shards: int) -> None:
    """Attempt records like a finished distill + filter pass writes (two stages of ``shards``)."""
    for stage in ("distill", "filter"):
        for i in range(shards):
            shard = f"src-{i:05d}"
            storage.write_json(
                paths.state_uri(stage, shard),
                {
                    "stage": stage, "shard": shard, "state": "COMPLETED", "attempt": 1,
                    "run_id": paths.run_id, "seconds": 1.25, "total_seconds": 1.25,
                    "questions": 100, "samples": 1600, "accepted": 1100, "owner": f"host:{i}:abcdef",
                    "started_at": "2026-12-07T14:00:00+00:00", "finished_at": "2026-12-07T14:00:01+00:00",
                    "input_commit": "0123456789abcdef", "fingerprint": "fedcba9876543210",
                },
            )  # fmt: skip


def held_first(paths: RunPaths) -> None:
    rows = shard_table_rows(shard_states(paths))
    storage.write_bytes(paths.shard_table(None), shard_table_csv(rows))


def one_at_a_time(paths: RunPaths) -> None:
    shard_table(paths)


def measure(fn, paths: RunPaths) -> tuple[float, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    fn(paths)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("shards  way             peak traced MB  seconds (median)")
    for n in args.shards:
        with tempfile.TemporaryDirectory() as tmp:
            paths = RunPaths(tmp, "bench")
            seed(paths, n)
            for name, fn in (("held first", held_first), ("one at a time", one_at_a_time)):
                runs = [measure(fn, paths) for _ in range(args.repeats)]
                peak = statistics.median(r[0] for r in runs)
                secs = statistics.median(r[1] for r in runs)
                print(f"{2 * n:>6}  {name:<14}  {peak:>14.1f}  {secs:>8.2f}")


if __name__ == "__main__":
    main()
