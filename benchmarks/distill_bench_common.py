"""What the distillation benchmarks share: the sandbox teacher, the questions, the engine config.

Used by ``bench_distill.py`` (measurement and command line), ``distill_bench_curator.py`` (the
curator side-by-side) and ``distill_bench_compaction.py`` (the compaction memory run). The entry
script puts the repository root on ``sys.path`` before importing this.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from sandbox_process import start_sandbox_process

from octomed_data import storage
from octomed_data.schema import QUESTION_SCHEMA, question_row
from octomed_data.teachers import DistillConfig

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


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total
