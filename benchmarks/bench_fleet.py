"""Benchmark a teacher fleet: samples/s with 1, 2 and 3 replicas at the same per-replica latency.

Each replica is a sandbox teacher in its own process (``octomed-data sandbox-teacher``) with the
same latency and the same concurrency cap (``--max-concurrency``: requests beyond it queue, as on
a GPU server with that many batch slots), so one replica's throughput is bounded at
``cap / latency`` and only more replicas raise it. The engine distills a fresh shard per run
(every sample verified, journalled, compacted), with a teacher in-flight bound high enough for
all three replicas, so the client is not the limit. The baseline (1 replica) is the ordinary
single-``base_url`` teacher; 2 and 3 list ``endpoints``. The order of the three runs rotates
every round. Reported: steady samples/s (10%-90% of durable samples) per run, the median per
replica count, the median of the per-round ratios against 1 replica, and how the requests were
spread over the replicas (the servers' own counts).

    .venv/bin/python benchmarks/bench_fleet.py --rounds 3 --questions 60 --latency-ms 250 --max-concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox_process import start_sandbox_process  # noqa: E402  (benchmarks/ is on sys.path)

from octomed_data import storage  # noqa: E402
from octomed_data.distill import adistill_shard  # noqa: E402
from octomed_data.inference.ratelimit import LocalRateLimiter  # noqa: E402
from octomed_data.schema import QUESTION_SCHEMA, question_row  # noqa: E402
from octomed_data.teachers import DistillConfig  # noqa: E402

N = 16
DRUGS = ["Metformin", "Insulin glargine", "Glipizide", "Sitagliptin", "Pioglitazone"]


def start_replica(latency_ms: float, cap: int) -> tuple[subprocess.Popen, str]:
    return start_sandbox_process(
        "--latency-ms", str(latency_ms), "--max-concurrency", str(cap), "--style", "mixed"
    )


def served(base_url: str) -> int:
    """Requests a replica has answered so far (its own count)."""
    root = base_url[: -len("/v1")]
    with urllib.request.urlopen(f"{root}/_sandbox/stats", timeout=10) as r:
        return int(json.loads(r.read())["completed"])


def write_questions(uri: str, n: int, tag: str) -> None:
    rows = [
        question_row(
            source="bench",
            split="train",
            task_type="text_mcq",
            question=f"Case {tag}-{i}: a 54-year-old with new type 2 diabetes, HbA1c 7.{i % 10}%. First-line drug?",
            answer="A",
            input_file="bench",
            record_index=i,
            options={chr(65 + j): DRUGS[j] for j in range(4)},
        )
        for i in range(n)
    ]
    storage.Dataset(uri, QUESTION_SCHEMA).write_shard("00000", rows)


class Stamps:
    """A tqdm-like progress sink: when each durable sample was counted."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def update(self, n: int = 1) -> None:
        self.t.extend([time.perf_counter()] * n)


def steady_rate(stamps: list[float]) -> float:
    """Samples per second between the 10% and 90% completion marks."""
    stamps = sorted(stamps)
    lo, hi = int(0.1 * len(stamps)), int(0.9 * len(stamps)) - 1
    return (hi - lo) / (stamps[hi] - stamps[lo])


def config(urls: list[str], in_flight: int) -> DistillConfig:
    teacher: dict = {"name": "fleet", "model": "bench", "server": "generic", "max_in_flight": in_flight}
    if len(urls) == 1:
        teacher["base_url"] = urls[0]  # the baseline: an ordinary single-endpoint teacher
    else:
        teacher["endpoints"] = urls
    # Journal segments every 50 ms: durable-sample stamps then track completions closely enough
    # for a 10%-90% rate over runs of a few seconds (the default 0.5 s would quantise them).
    return DistillConfig.parse({"teachers": [teacher], "samples": N, "flush_interval_s": 0.05})


async def one_run(urls: list[str], work: str, questions: int, in_flight: int, tag: str) -> float:
    q_uri = storage.join(work, f"q-{tag}")
    write_questions(q_uri, questions, tag)
    cfg = config(urls, in_flight)
    stamps = Stamps()
    report = await adistill_shard(
        q_uri,
        "00000",
        storage.join(work, f"out-{tag}"),
        cfg,
        limiter=LocalRateLimiter.for_teachers(cfg.teachers),
        progress=stamps,
    )
    if not report.complete:
        raise SystemExit(f"run {tag} incomplete: {report}")
    return steady_rate(stamps.t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--questions", type=int, default=60, help="questions per run (x16 samples)")
    ap.add_argument("--latency-ms", type=float, default=250.0)
    ap.add_argument("--max-concurrency", type=int, default=8, help="per replica")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-sandbox")  # the loopback sandbox takes any key
    counts = (1, 2, 3)
    in_flight = 2 * args.max_concurrency * max(counts)  # the client never limits 3 replicas
    procs = [start_replica(args.latency_ms, args.max_concurrency) for _ in range(max(counts))]
    urls = [u for _, u in procs]
    rates: dict[int, list[float]] = {k: [] for k in counts}
    spread: dict[int, list[list[int]]] = {k: [] for k in counts}
    try:
        with tempfile.TemporaryDirectory() as work:
            asyncio.run(one_run(urls[:1], work, 4, in_flight, "warm"))  # imports, connections
            for r in range(args.rounds):
                order = counts[r % len(counts) :] + counts[: r % len(counts)]
                for k in order:
                    before = [served(u) for u in urls]
                    rate = asyncio.run(one_run(urls[:k], work, args.questions, in_flight, f"r{r}k{k}"))
                    rates[k].append(rate)
                    spread[k].append([served(u) - b for u, b in zip(urls, before, strict=True)])
                    print(
                        f"round {r + 1}, {k} replica(s): {rate:.1f} samples/s, requests per replica {spread[k][-1]}"
                    )
    finally:
        for p, _ in procs:
            p.terminate()
            p.wait(10)
    ceiling = args.max_concurrency / (args.latency_ms / 1000.0)
    result = {
        "latency_ms": args.latency_ms,
        "max_concurrency": args.max_concurrency,
        "replica_ceiling_rps": ceiling,
        "questions": args.questions,
        "samples_per_run": args.questions * N,
        "rounds": args.rounds,
        "rates": rates,
        "median": {k: statistics.median(v) for k, v in rates.items()},
        "ratio_vs_1": {
            k: statistics.median(a / b for a, b in zip(v, rates[1], strict=True)) for k, v in rates.items()
        },
        "spread": spread,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
