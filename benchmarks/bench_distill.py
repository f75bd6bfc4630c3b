"""Benchmark the distillation engine against the loopback sandbox teacher.

1. Throughput: steady-state samples/s at 256 in-flight against a sandbox with 100 ms latency
   and no capacity limit, running in a separate process. The engine (verifying and persisting
   every sample to the journal, then compacting to Parquet) and a bare asyncio loop of
   ``AsyncOpenAI`` calls at the same concurrency that stores nothing run alternately, several
   rounds; steady state = the samples between the 10% and 90% completion marks over the time
   between them. Reported: the median of each and the median per-round ratio.
2. Memory: peak RSS summed over this process and its children (the sandbox server) while the
   engine distills more and more samples (shards of ``--shard-questions`` questions x 16),
   reported at checkpoints, to show it is flat in the number of samples.

    .venv/bin/python benchmarks/bench_distill.py --rounds 3 --samples 4000 --rss-checkpoints 25000,50000,100000
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
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from octomed_data import storage  # noqa: E402
from octomed_data.distill import adistill_shard  # noqa: E402
from octomed_data.inference.ratelimit import LocalRateLimiter  # noqa: E402
from octomed_data.prompts import build_messages  # noqa: E402
from octomed_data.schema import QUESTION_SCHEMA, question_row  # noqa: E402
from octomed_data.teachers import DistillConfig  # noqa: E402

N = 16
IN_FLIGHT = 256
DRUGS = ["Metformin", "Insulin glargine", "Glipizide", "Sitagliptin", "Pioglitazone"]


def start_server(latency_ms: float, honour_n: bool = False) -> tuple[subprocess.Popen, str]:
    faults = ["--faults", json.dumps({"honour_n": True})] if honour_n else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "octomed_data.cli", "sandbox-teacher", "--port", "0", "--no-log"]
        + ["--latency-ms", str(latency_ms), "--style", "mixed"]
        + faults,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"sandbox did not start: {line!r}")
    return proc, line.split()[-1]


def write_questions(uri: str, shard: str, n: int, offset: int) -> None:
    rows = []
    for i in range(offset, offset + n):
        opts = {chr(65 + j): DRUGS[j] for j in range(4)}
        rows.append(
            question_row(
                source="bench",
                split="train",
                task_type="text_mcq",
                question=f"Case {i}: a 54-year-old with new type 2 diabetes and HbA1c 7.{i % 10}%. First-line drug?",
                answer="A",
                input_file="bench",
                record_index=i,
                options=opts,
            )
        )
    storage.Dataset(uri, QUESTION_SCHEMA).write_shard(shard, rows)


def steady_rate(stamps: list[float]) -> float:
    """Samples per second between the 10% and 90% completion marks."""
    stamps = sorted(stamps)
    lo, hi = int(0.1 * len(stamps)), int(0.9 * len(stamps)) - 1
    return (hi - lo) / (stamps[hi] - stamps[lo])


class Stamps:
    """A tqdm-like progress sink recording when each durable sample was counted."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def update(self, n: int = 1) -> None:
        now = time.perf_counter()
        self.t.extend([now] * n)


SUPPORTS_N = False  # --supports-n: one request returns all N samples (as vLLM honours n)


def config(base_url: str) -> DistillConfig:
    teacher = {"name": "sandbox", "base_url": base_url, "model": "bench", "max_in_flight": IN_FLIGHT}
    if SUPPORTS_N:
        teacher["supports_n"] = True
    return DistillConfig.parse(
        {
            "teachers": [teacher],
            "samples": N,
        }
    )


async def engine_round(base_url: str, work: str, questions: int, tag: str) -> float:
    q_uri = storage.join(work, f"q-{tag}")
    write_questions(q_uri, "00000", questions, 0)
    stamps = Stamps()
    cfg = config(base_url)
    await adistill_shard(
        q_uri,
        "00000",
        storage.join(work, f"out-{tag}"),
        cfg,
        limiter=LocalRateLimiter.for_teachers(cfg.teachers),
        progress=stamps,
    )
    return steady_rate(stamps.t)


async def bare_round(base_url: str, questions: int) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=os.environ["OPENAI_API_KEY"], base_url=base_url, max_retries=0)
    slots = asyncio.Semaphore(IN_FLIGHT)
    stamps: list[float] = []
    rows = [
        {
            "question": f"Case {i}: a 54-year-old with new type 2 diabetes. First-line drug?",
            "task_type": "text_mcq",
            "options": [{"label": chr(65 + j), "text": DRUGS[j]} for j in range(4)],
        }
        for i in range(questions)
    ]

    async def one(messages, seed: int) -> None:
        async with slots:
            await client.chat.completions.create(model="bench", messages=messages, seed=seed, max_tokens=8192)
        stamps.append(time.perf_counter())

    tasks = []
    for i, row in enumerate(rows):
        messages = build_messages(row)
        for s in range(N):
            # Same back-pressure as the engine: never more than 2x in-flight tasks queued.
            while len(tasks) >= 2 * IN_FLIGHT:
                done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                tasks = list(pending)
            tasks.append(asyncio.create_task(one(messages, i * N + s)))
    await asyncio.gather(*tasks)
    await client.close()
    return steady_rate(stamps)


def tree_rss() -> int:
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


async def rss_run(base_url: str, work: str, checkpoints: list[int], shard_questions: int) -> list[dict]:
    """Distill shard after shard, sampling the process tree's RSS every 0.2 s."""
    peak = [0]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss())
            time.sleep(0.2)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    cfg = config(base_url)
    limiter = LocalRateLimiter.for_teachers(cfg.teachers)
    q_uri, out = storage.join(work, "rss-q"), storage.join(work, "rss-out")
    results, done, shard, started = [], 0, 0, time.monotonic()
    try:
        for target in checkpoints:
            while done < target:
                name = f"{shard:05d}"
                write_questions(q_uri, name, shard_questions, shard * shard_questions)
                report = await adistill_shard(q_uri, name, out, cfg, limiter=limiter)
                done += report.new_samples
                shard += 1
            results.append(
                {
                    "samples": done,
                    "peak_rss_mb": round(peak[0] / 2**20, 1),
                    "elapsed_s": round(time.monotonic() - started, 1),
                }
            )
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        stop.set()
        thread.join()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4096, help="samples per throughput round")
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--rss-checkpoints", default="25000,50000,100000")
    ap.add_argument("--shard-questions", type=int, default=500)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument(
        "--supports-n",
        action="store_true",
        help="teacher and sandbox use n=N per request: the cheap way to reach 1M samples for the RSS run",
    )
    args = ap.parse_args()
    global SUPPORTS_N
    SUPPORTS_N = args.supports_n
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-sandbox")
    server, base_url = start_server(args.latency_ms, honour_n=args.supports_n)
    result: dict = {
        "cpu_count": os.cpu_count(),
        "in_flight": IN_FLIGHT,
        "latency_ms": args.latency_ms,
        "supports_n": args.supports_n,
    }
    try:
        with tempfile.TemporaryDirectory(prefix="bench-distill-") as work:
            questions = max(1, args.samples // N)
            if not args.skip_throughput:
                asyncio.run(bare_round(base_url, 32))  # warm-up: connections, imports
                engine, bare, ratios, cpu_b, cpu_e = [], [], [], [], []
                for r in range(args.rounds):
                    # Client-process CPU per sample is robust to other load on a shared VM;
                    # wall-clock samples/s is what a run sees.
                    c0 = time.process_time()
                    b = asyncio.run(bare_round(base_url, questions))
                    c1 = time.process_time()
                    e = asyncio.run(engine_round(base_url, work, questions, f"r{r}"))
                    c2 = time.process_time()
                    bare.append(b)
                    engine.append(e)
                    ratios.append(e / b)
                    cpu_b.append((c1 - c0) / (questions * N) * 1000)
                    cpu_e.append((c2 - c1) / (questions * N) * 1000)
                    print(
                        f"round {r}: bare {b:.0f}/s engine {e:.0f}/s ratio {e / b:.2f}; "
                        f"cpu ms/sample bare {cpu_b[-1]:.2f} engine {cpu_e[-1]:.2f}",
                        file=sys.stderr,
                    )
                result["throughput"] = {
                    "samples_per_round": questions * N,
                    "bare_samples_per_s": [round(x, 1) for x in bare],
                    "engine_samples_per_s": [round(x, 1) for x in engine],
                    "bare_median": round(statistics.median(bare), 1),
                    "engine_median": round(statistics.median(engine), 1),
                    "ratio_median": round(statistics.median(ratios), 3),
                    "cpu_ms_per_sample_bare": [round(x, 3) for x in cpu_b],
                    "cpu_ms_per_sample_engine": [round(x, 3) for x in cpu_e],
                    "cpu_ratio_median": round(
                        statistics.median(b / e for b, e in zip(cpu_b, cpu_e, strict=True)), 3
                    ),
                }
            checkpoints = [int(x) for x in args.rss_checkpoints.split(",") if x]
            if checkpoints:
                result["rss"] = asyncio.run(rss_run(base_url, work, checkpoints, args.shard_questions))
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
