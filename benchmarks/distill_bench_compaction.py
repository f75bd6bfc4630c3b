"""``bench_distill.py --compaction N``: journal and compaction memory for N synthetic samples.

Realistic trace lengths (reasoning log-normal, median ~4 KB, capped at 32 KB), written through the
journal writer and compacted through the engine's compaction, shard after shard; no teacher.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time

import psutil
from distill_bench_common import N, dir_bytes

from octomed_data.teachers import DistillConfig

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

            async def journal_shard(shard: str = shard, n: int = n) -> dict[str, bool]:
                writer = JournalWriter(out, shard, every=256, interval_s=0.5).start()
                qids: dict[str, bool] = {}  # question id -> has an image (compact_shard's route)
                for i in range(n):
                    row = synthetic_row(rng, i, shard)
                    row["prompt_version"] = cfg.prompt_version
                    row["params_hash"] = cfg.teachers[0].params_hash()
                    qids[row["question_id"]] = False  # text_mcq: no image
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
