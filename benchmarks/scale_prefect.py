"""``bench_scale.py --prefect``: the same passes through Prefect, as the flows run them.

Each pass runs distill and filter with :func:`flows.common.run_stage_flow` (the Prefect executor,
one task per shard, the stage's progress card and shard table) inside one flow, then the
factory's whole-run shard table and artifact index, against one Prefect API on SQLite that the
parent starts for all passes (its CPU is not the child's). After each pass the parent reads the
database's size on disk and every artifact the API holds (count, bytes of data + description as
JSON): a re-run must add ~nothing (artifacts are replaced, not appended: ``flows/artifacts.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def start_server(folder: str) -> tuple[Any, str, Path]:
    """A Prefect API on a SQLite file in ``folder`` (kept across passes); (server, API URL, db file)."""
    import prefect.settings as ps
    from prefect.server.api.server import SubprocessASGIServer

    from octomed_data.inference.vllm_service import free_port

    db = Path(folder) / "prefect.db"
    url = f"sqlite+aiosqlite:///{db}"
    os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no telemetry calls from a sandbox
    with ps.temporary_settings(updates={ps.PREFECT_SERVER_DATABASE_CONNECTION_URL: url}):
        server = SubprocessASGIServer(port=free_port())
        server.start(timeout=180)
    return server, server.api_url, db


def run_pass(paths: Any, stages: tuple[Any, ...], workers: int, trace: Any = None) -> dict[str, Any]:
    """One pass in this process (the child) through Prefect; the stages' states (and ``trace()``'s
    look at the Python memory before the flow run ends, under ``"trace"``, when given)."""
    from collections import Counter

    from prefect import flow

    from flows.common import RunParams, publish_artifact_index, publish_shard_table, run_stage_flow

    @flow(name="bench-scale", log_prints=False)
    def bench_scale() -> dict[str, Any]:
        run = RunParams(run_id=paths.run_id, store=paths.store)
        out = {}
        for stage in stages:
            result = run_stage_flow(stage, run, max_in_flight=workers)
            out[stage.name] = {"states": dict(Counter(o.state for o in result.outcomes.values()))}
        publish_shard_table(paths)  # the factory's whole-run table and its index card
        publish_artifact_index(paths)
        if trace is not None:  # while the flow run (and what it holds) is still there
            out["trace"] = trace()
        return out

    return bench_scale()


def measure(api_url: str, db: Path) -> dict[str, Any]:
    """What the API holds now: database bytes on disk (+ WAL), artifacts (count, bytes), flow runs."""
    import prefect.settings as ps
    from prefect.client.orchestration import get_client

    db_bytes = sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())
    count = size = 0
    with ps.temporary_settings(updates={ps.PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            offset = 0
            while True:
                page = client.read_artifacts(limit=200, offset=offset)
                for a in page:
                    count += 1
                    size += len(json.dumps({"data": a.data, "description": a.description}, default=str))
                offset += len(page)
                if len(page) < 200:
                    break
            flow_runs = client.count_flow_runs()
    return {"db_bytes": db_bytes, "artifacts": count, "artifact_bytes": size, "flow_runs": flow_runs}


def store_files(root: str) -> int:
    """Files under a run's folder (local or an object store), temp files included."""
    from octomed_data import storage

    fs, path = storage.filesystem(root)
    return len(fs.find(path))
