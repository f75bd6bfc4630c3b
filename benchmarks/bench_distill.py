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

3. ``--vs-curator``: bespokelabs-curator 0.1.31 (installed by this script into its own cached venv)
   and the engine, each in a fresh child process, on the same sandbox (100 ms), the same prompts
   (400 questions x 16), 256 in flight, alternating which goes first over ``--rounds`` rounds.
   Per run: steady samples/s (10%-90% of completions: the engine's durable-sample stamps,
   curator's response-file lines as it appends them), client CPU = user+sys of the child and all
   its descendants (``getrusage(RUSAGE_CHILDREN)`` around the run), peak RSS of the process tree.
4. ``--compaction N``: memory and journal size for N samples with realistic trace lengths
   (reasoning log-normal, median ~4 KB, capped at 32 KB), written through the journal writer and
   compacted through the engine's compaction, shard after shard; no teacher involved.

    .venv/bin/python benchmarks/bench_distill.py --vs-curator --rounds 3 --skip-throughput --rss-checkpoints ""
    .venv/bin/python benchmarks/bench_distill.py --compaction 1000000 --skip-throughput --rss-checkpoints ""
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import distill_bench_common  # noqa: E402  (benchmarks/ is on sys.path)
from distill_bench_common import (  # noqa: E402,F401  (start_server: bench_eval.py imports it from here)
    DRUGS,
    IN_FLIGHT,
    N,
    Stamps,
    config,
    dir_bytes,
    start_server,
    steady_rate,
    write_questions,
)
from distill_bench_compaction import compaction_run  # noqa: E402
from distill_bench_curator import vs_curator  # noqa: E402

from octomed_data import storage  # noqa: E402
from octomed_data.distill import adistill_shard  # noqa: E402
from octomed_data.inference.ratelimit import LocalRateLimiter  # noqa: E402
from octomed_data.prompts import build_messages  # noqa: E402


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


def engine_worker(args: argparse.Namespace) -> None:
    """One engine run in this (child) process: prints steady samples/s and samples stored."""
    stamps = Stamps()
    cfg = config(args.base_url)
    report = asyncio.run(
        adistill_shard(
            args.questions,
            "00000",
            args.out,
            cfg,
            limiter=LocalRateLimiter.for_teachers(cfg.teachers),
            progress=stamps,
        )
    )
    print(
        json.dumps(
            {"steady": round(steady_rate(stamps.t), 1), "stored": report.stored, "complete": report.complete}
        )
    )


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
    ap.add_argument("--vs-curator", action="store_true", help="curator vs octomed-data, side by side")
    ap.add_argument("--questions-per-round", type=int, default=400)
    ap.add_argument("--compaction", type=int, default=0, help="samples for the compaction memory run")
    ap.add_argument("--compaction-shard", type=int, default=8000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    ap.add_argument("--questions", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        os.environ.setdefault("OPENAI_API_KEY", "sk-bench-sandbox")
        engine_worker(args)
        return
    distill_bench_common.SUPPORTS_N = args.supports_n  # config() reads it there
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
            if args.vs_curator:
                result["vs_curator"] = vs_curator(base_url, work, args.rounds, args.questions_per_round)
            if args.compaction:
                result["compaction"] = compaction_run(work, args.compaction, args.compaction_shard)
            checkpoints = [int(x) for x in args.rss_checkpoints.split(",") if x]
            if checkpoints:
                result["rss"] = asyncio.run(rss_run(base_url, work, checkpoints, args.shard_questions))
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
