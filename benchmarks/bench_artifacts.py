"""Artifact data a stage publishes to the Prefect API, for 20 / 100 / 300 shards.

Runs the real publishing path (:func:`flows.common.run_stage_flow` with its progress artifact and
end-of-stage shard table, then the factory's artifact index) over a stage whose shards finish at
once, with the Prefect calls replaced by recorders that sum the bytes they would send (JSON as the
client serialises it). Before issue 16 the shard table was re-published in full after every shard
(0.075 / 1.26 / 10.4 MB for 20 / 100 / 300 shards: quadratic); now it is published once per stage.

    .venv/bin/python benchmarks/bench_artifacts.py --shards 20 100 300
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flows.common as common  # noqa: E402
from octomed_data.layout import RunPaths  # noqa: E402
from octomed_data.stages import Stage, run_one  # noqa: E402

_QUIET = logging.getLogger("bench_artifacts")
_QUIET.disabled = True  # failed shards log an error line each: not what is measured


class BenchStage(Stage):
    """N shards with distill-like counts and a realistic error on every tenth."""

    name = "distill"

    def __init__(self, paths: RunPaths, n: int) -> None:
        super().__init__(paths)
        self.n = n

    def input_shards(self) -> list[str]:
        return [f"medqa-{i:05d}" for i in range(self.n)]

    def run_shard(self, shard: str) -> dict[str, Any]:
        if int(shard[-5:]) % 10 == 9:
            raise RuntimeError(
                "ShardIncomplete: 3 samples failed <- caused by teacher 'default' at http://10.0.0.5:8000/v1: "
                "outage budget of 120 s spent (57 consecutive failed attempts over 120.3 s, no reply); "
                "last server error: connection error: Connection refused"
            )
        return {"questions": 200, "samples": 1600, "new_samples": 1600, "requests": 1700, "retries": 12}


class Recorder:
    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def add(self, payload: Any) -> None:
        self.bytes += len(json.dumps(payload, default=str).encode())
        self.calls += 1


class InProcess:
    """Executor stand-in: run_one per shard here, outcomes reported as the Prefect executor does."""

    def __init__(self, on_outcome: Any, **_: Any) -> None:
        self.on_outcome = on_outcome

    def map(self, stage: Stage, shards: list[str], *, force: bool = False) -> dict[str, Any]:
        from octomed_data.stages import ShardOutcome, describe_error

        out = {}
        for s in shards:
            try:
                out[s] = run_one(stage, s, force=force)
            except Exception as exc:
                out[s] = ShardOutcome(s, "FAILED", error=describe_error(exc))
            self.on_outcome(out[s])
        return out


def measure(n: int) -> dict[str, Any]:
    import prefect.artifacts as artifacts

    import tasks.prefect_executor as executor

    rec = Recorder()
    patches = {
        (common, "create_table_artifact"): lambda rows, **kw: rec.add({"data": rows, **kw}),
        (common, "create_markdown_artifact"): lambda md, **kw: rec.add({"data": md, **kw}),
        (artifacts, "create_progress_artifact"): lambda p, **kw: rec.add({"data": p, **kw}) or "id",
        (artifacts, "update_progress_artifact"): lambda i, p: rec.add({"id": i, "data": p}),
        (executor, "PrefectExecutor"): InProcess,
        (common, "get_run_logger"): lambda: _QUIET,
    }
    saved = {k: getattr(*k) for k in patches}
    for (mod, name), fn in patches.items():
        setattr(mod, name, fn)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = RunPaths(tmp, f"bench-{n}")
            stage = BenchStage(paths, n)
            common.run_stage_flow(stage, common.RunParams(run_id=paths.run_id), raise_on_failure=False)
            common.publish_shard_table(paths)  # the factory's whole-run table
            common.publish_artifact_index(paths)
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
    return {
        "shards": n,
        "artifact_calls": rec.calls,
        "bytes": rec.bytes,
        "bytes_per_shard": round(rec.bytes / n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[20, 100, 300])
    args = parser.parse_args()
    rows = [measure(n) for n in args.shards]
    for r in rows:
        print(json.dumps(r))
    first, last = rows[0], rows[-1]
    ratio = (last["bytes"] / first["bytes"]) / (last["shards"] / first["shards"])
    print(f"growth vs linear from {first['shards']} to {last['shards']} shards: x{ratio:.2f} (1.0 = linear)")


if __name__ == "__main__":
    main()
