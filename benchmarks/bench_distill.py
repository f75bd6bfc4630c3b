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
import random
import resource
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

from sandbox_process import start_sandbox_process  # noqa: E402  (benchmarks/ is on sys.path)

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
    return start_sandbox_process("--latency-ms", str(latency_ms), "--style", "mixed", *faults)


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


CURATOR = "bespokelabs-curator==0.1.31"


def curator_python() -> tuple[str, dict[str, str]]:
    """curator's own venv (built once, cached) and the environment it runs offline with."""
    from octomed_data.venvs import cached_venv

    python, _ = cached_venv("curator-0.1.31", [[CURATOR]], log=lambda m: print(m, file=sys.stderr))
    site = subprocess.run(
        [python, "-c", "import litellm, os; print(os.path.dirname(litellm.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": os.path.join(site, "litellm_core_utils", "tokenizers"),
        "TELEMETRY_ENABLED": "false",
        "CURATOR_DISABLE_RICH_DISPLAY": "1",  # its live console costs CPU: curator at its leanest
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)
    return python, env


class LineTail:
    """Times lines appended to the files matching ``pattern`` under ``root`` (read by the parent)."""

    def __init__(self, root: str, pattern: str = "responses_") -> None:
        self.root, self.pattern = root, pattern
        self.offsets: dict[str, int] = {}
        self.stamps: list[float] = []

    def poll(self) -> None:
        now = time.perf_counter()
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                if not (f.startswith(self.pattern) and f.endswith(".jsonl")):
                    continue
                path = os.path.join(dirpath, f)
                try:
                    with open(path, "rb") as fh:
                        fh.seek(self.offsets.get(path, 0))
                        chunk = fh.read()
                except OSError:
                    continue
                complete = chunk.rfind(b"\n") + 1
                self.offsets[path] = self.offsets.get(path, 0) + complete
                self.stamps.extend([now] * chunk[:complete].count(b"\n"))


def measured(cmd: list[str], env: dict[str, str], tail: LineTail | None = None) -> dict:
    """Run ``cmd`` as a child; its CPU (with every descendant), peak tree RSS, its JSON output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        if tail is not None:
            tail.poll()
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if tail is not None:
        tail.poll()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        raise SystemExit(f"{cmd[:3]} failed (rc {proc.returncode})")
    result = json.loads(out[-1])
    result.update(
        cpu_s=round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
        peak_rss_mb=round(peak / 2**20, 1),
        wall_s=round(wall, 2),
    )
    return result


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


def vs_curator(base_url: str, work: str, rounds: int, questions: int) -> dict:
    python, cur_env = curator_python()
    q_uri = storage.join(work, "vs-q")
    write_questions(q_uri, "00000", questions, 0)
    rows = storage.Dataset(q_uri, QUESTION_SCHEMA).read_all().to_pylist()
    prompts = os.path.join(work, "prompts.json")
    with open(prompts, "w") as fh:
        json.dump([build_messages(r) for r in rows], fh)  # the engine's own messages
    eng_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs: dict[str, list[dict]] = {"curator": [], "octomed": []}
    for r in range(rounds):
        order = ["curator", "octomed"] if r % 2 == 0 else ["octomed", "curator"]
        for who in order:
            if who == "curator":
                cache = os.path.join(work, f"curator-cache-{r}")
                env = {**cur_env, "CURATOR_CACHE_DIR": cache}
                tail = LineTail(cache)
                cmd = [python, str(ROOT / "benchmarks" / "distill_curator_worker.py"), prompts, base_url]
                res = measured([*cmd, str(N), str(IN_FLIGHT)], env, tail)
                res["steady"] = round(steady_rate(tail.stamps), 1)
                res["stored"] = res.pop("rows")
            else:
                out = storage.join(work, f"vs-out-{r}")
                cmd = [sys.executable, __file__, "--worker", "--base-url", base_url, "--questions", q_uri]
                res = measured([*cmd, "--out", out], eng_env)
                res["journal_bytes_after"] = dir_bytes(os.path.join(out, "_journal"))
                res["raw_bytes"] = dir_bytes(os.path.join(out, "raw"))
            res["cpu_ms_per_sample"] = round(1000 * res["cpu_s"] / max(1, res["stored"]), 3)
            runs[who].append(res)
            print(f"round {r} {who}: {json.dumps(res)}", file=sys.stderr, flush=True)
    med = {
        who: {k: statistics.median(x[k] for x in rs) for k in ("steady", "cpu_ms_per_sample", "peak_rss_mb")}
        for who, rs in runs.items()
    }
    ratios = [o["steady"] / c["steady"] for o, c in zip(runs["octomed"], runs["curator"], strict=True)]
    cpu = [
        o["cpu_ms_per_sample"] / c["cpu_ms_per_sample"]
        for o, c in zip(runs["octomed"], runs["curator"], strict=True)
    ]
    return {
        "samples_per_round": questions * N,
        "runs": runs,
        "median": med,
        "throughput_ratio_median": round(statistics.median(ratios), 3),
        "cpu_per_sample_ratio_median": round(statistics.median(cpu), 3),
    }


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


WORDS = (
    "the patient presents with acute chest pain troponin elevated ecg shows st elevation in leads ii iii "
    "avf suggesting inferior myocardial infarction differential includes aortic dissection pericarditis "
    "pulmonary embolism management aspirin heparin reperfusion within ninety minutes consider beta blocker "
    "unless contraindicated heart failure bradycardia hypotension renal function creatinine clearance dose "
    "adjusted metformin insulin glucose hba1c first line therapy option a b c d is most consistent with"
).split()


_POOL: list[str] = []


def text_pool(size: int = 16 * 2**20) -> str:
    """16 MB of random words: traces are slices of it (a pool this large keeps a journal segment's
    rows from sharing text, so compression ratios stay those of independent texts)."""
    if not _POOL:
        rng = random.Random(1)
        words = rng.choices(WORDS, k=size // 6)
        _POOL.append(" ".join(words))
    return _POOL[0]


def synthetic_row(rng: random.Random, i: int, shard: str) -> dict:
    """A journal row with a realistic reasoning length: log-normal, median ~4 KB, capped at 32 KB."""
    pool = text_pool()
    chars = min(32_768, int(rng.lognormvariate(8.3, 0.7)))
    start = rng.randrange(len(pool) - chars)
    q = i // N
    return {
        "question_id": f"{shard}-q{q}",
        "source": "bench",
        "task_type": "text_mcq",
        "sample_idx": i % N,
        "seed": rng.randrange(2**31),
        "teacher": "sandbox",
        "model": "bench",
        "prompt_version": "v1",
        "params_hash": "p",
        "gold_answer": "A",
        "reasoning": pool[start : start + chars],
        "response": f"The answer is ({'ABCD'[rng.randrange(4)]}).",
        "refusal": None,
        "finish_reason": "stop",
        "prompt_tokens": 120 if i % N == 0 else 0,
        "completion_tokens": chars // 4,
        "latency_s": 0.1,
        "attempts": 1,
        "created_at": int(time.time() * 1000),
    }


def compaction_run(work: str, total: int, shard_samples: int) -> dict:
    """Journal + compaction for ``total`` synthetic samples, shard by shard, in this process.

    Peak RSS (this process) is sampled every 0.1 s; the journal's size is read at its largest
    (just before each compaction) and after; ``journal/parquet`` ratios are per shard.
    """
    from octomed_data.distill.engine import ShardReport, compact_shard
    from octomed_data.distill.journal import JournalWriter, journal_uri

    peak = [0]
    stop = threading.Event()

    def sampler() -> None:
        me = psutil.Process()
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.1)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    cfg = DistillConfig.parse(
        {"teachers": [{"name": "sandbox", "base_url": "http://x/v1", "model": "bench"}], "samples": N}
    )
    rng = random.Random(0)
    out = os.path.join(work, "compaction")
    checkpoints, done, shard_no = [], 0, 0
    journal_peak = parquet_total = journal_after = trace_chars = 0
    started = time.monotonic()
    try:
        while done < total:
            shard = f"{shard_no:05d}"
            n = min(shard_samples, total - done)

            async def journal_shard(shard: str = shard, n: int = n) -> set[str]:
                writer = JournalWriter(out, shard, every=256, interval_s=0.5).start()
                qids = set()
                for i in range(n):
                    row = synthetic_row(rng, i, shard)
                    row["prompt_version"] = cfg.prompt_version
                    row["params_hash"] = cfg.teachers[0].params_hash()
                    qids.add(row["question_id"])
                    writer.add(row)
                    nonlocal trace_chars
                    trace_chars += len(row["reasoning"])
                    if i % 256 == 255:
                        await asyncio.sleep(0)
                await writer.close()
                return qids

            qids = asyncio.run(journal_shard())
            jbytes = dir_bytes(journal_uri(out, shard))
            report = ShardReport(shard=shard, questions=len(qids), expected=n)
            compact_shard(out, shard, cfg, qids, report, time.monotonic())
            pbytes = os.path.getsize(os.path.join(out, "raw", f"part-{shard}.parquet"))
            journal_peak = max(journal_peak, jbytes)
            parquet_total += pbytes
            journal_after += dir_bytes(journal_uri(out, shard))
            checkpoints.append(
                {
                    "samples": done + n,
                    "journal_mb": round(jbytes / 2**20, 2),
                    "parquet_mb": round(pbytes / 2**20, 2),
                }
            )
            done += n
            shard_no += 1
            if shard_no % 10 == 0 or done >= total:
                print(
                    json.dumps(
                        {
                            "samples": done,
                            "peak_rss_mb": round(peak[0] / 2**20, 1),
                            "elapsed_s": round(time.monotonic() - started, 1),
                        }
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        stop.set()
        thread.join()
    ratios = [c["journal_mb"] / c["parquet_mb"] for c in checkpoints if c["parquet_mb"]]
    return {
        "samples": done,
        "shards": shard_no,
        "shard_samples": shard_samples,
        "reasoning_chars_mean": round(trace_chars / max(1, done)),
        "peak_rss_mb": round(peak[0] / 2**20, 1),
        "parquet_mb": round(parquet_total / 2**20, 1),
        "journal_kb_per_1k_samples_while_running": round(
            statistics.median(c["journal_mb"] * 1024 / (shard_samples / 1000) for c in checkpoints), 1
        ),
        "journal_over_parquet_median": round(statistics.median(ratios), 3),
        "journal_peak_shard_mb": round(journal_peak / 2**20, 2),
        "journal_bytes_after_compaction": journal_after,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


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
