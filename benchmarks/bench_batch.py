"""Client cost of batch mode vs online requests, per 1k samples, against the loopback sandbox.

    .venv/bin/python benchmarks/bench_batch.py --rounds 5 --questions 200

The sandbox teacher runs in its own process (``octomed-data sandbox-teacher``, which also serves
the Files + Batch API; batches complete on the first status check). Each round distils the same
questions (``--questions`` x 16 samples, one request per sample) twice with ``adistill_shard``
in this process, into fresh folders: once with the teacher ``mode: online`` (256 in flight), once
``mode: batch`` (JSONL written, uploaded, submitted, polled every ``--poll-s``, output downloaded
and journalled), alternating which goes first. Client CPU is this process's user+sys time
(``time.process_time``, every thread) around the shard call: the server's CPU is not in it.
Prints one JSON line per run and a summary with medians (ms of client CPU and s of wall per 1k
samples, batch / online ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox_process import start_sandbox_process  # noqa: E402  (benchmarks/ is on sys.path)

from octomed_data import storage  # noqa: E402
from octomed_data.distill import adistill_shard  # noqa: E402
from octomed_data.schema import QUESTION_SCHEMA, question_row  # noqa: E402
from octomed_data.teachers import DistillConfig  # noqa: E402

N = 16
DRUGS = ["Metformin", "Insulin glargine", "Glipizide", "Sitagliptin", "Pioglitazone"]


def start_server() -> tuple[subprocess.Popen, str]:
    return start_sandbox_process()


def write_questions(uri: str, n: int) -> None:
    rows = []
    for i in range(n):
        k = 2 + i % 4
        rows.append(
            question_row(
                source="medqa",
                split="train",
                task_type="text_mcq",
                question=f"Case {i}: a {40 + i % 50}-year-old with new type 2 diabetes. First-line drug?",
                answer=chr(65 + i % k),
                input_file="synthetic",
                record_index=i,
                options={chr(65 + j): DRUGS[j] for j in range(k)},
            )
        )
    storage.Dataset(uri, QUESTION_SCHEMA).write_shard("00000", rows)


def config(base_url: str, mode: str, poll_s: float) -> DistillConfig:
    teacher = {
        "name": "sandbox",
        "base_url": base_url,
        "model": "sandbox-r1",
        "server": "generic",
        "max_in_flight": 256,
        "mode": mode,
        "batch_poll_s": poll_s,
    }
    return DistillConfig.parse({"teachers": [teacher], "samples": N})


def one_run(q_uri: str, out: str, cfg: DistillConfig) -> dict:
    c0, t0 = time.process_time(), time.perf_counter()
    report = asyncio.run(adistill_shard(q_uri, "00000", out, cfg, api_keys={"sandbox": "sk-bench"}))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    if not report.complete:
        raise SystemExit(f"{out}: incomplete ({report.failed} failed)")
    k = report.stored / 1000
    return {
        "mode": cfg.teachers[0].mode,
        "samples": report.stored,
        "batch_samples": report.batch_samples,
        "online_requests": report.requests,
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "cpu_ms_per_1k": round(cpu * 1000 / k, 1),
        "wall_s_per_1k": round(wall / k, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--poll-s", type=float, default=0.2)
    args = ap.parse_args()
    server, base_url = start_server()
    runs: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-batch-") as work:
            q_uri = storage.join(work, "q")
            write_questions(q_uri, args.questions)
            one_run(q_uri, storage.join(work, "warm"), config(base_url, "online", args.poll_s))  # imports
            for r in range(args.rounds):
                order = ("online", "batch") if r % 2 == 0 else ("batch", "online")
                for mode in order:
                    out = storage.join(work, f"{mode}-{r}")
                    run = one_run(q_uri, out, config(base_url, mode, args.poll_s)) | {"round": r + 1}
                    print(json.dumps(run), flush=True)
                    runs.append(run)
    finally:
        server.terminate()
        server.wait(10)
    summary: dict[str, dict] = {}
    for mode in ("online", "batch"):
        mine = [x for x in runs if x["mode"] == mode]
        summary[mode] = {
            "cpu_ms_per_1k": statistics.median(x["cpu_ms_per_1k"] for x in mine),
            "wall_s_per_1k": statistics.median(x["wall_s_per_1k"] for x in mine),
        }
    summary["ratio_cpu"] = round(summary["batch"]["cpu_ms_per_1k"] / summary["online"]["cpu_ms_per_1k"], 2)
    summary["ratio_wall"] = round(summary["batch"]["wall_s_per_1k"] / summary["online"]["wall_s_per_1k"], 2)
    print(json.dumps({"summary": summary, "samples_per_run": args.questions * N, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
