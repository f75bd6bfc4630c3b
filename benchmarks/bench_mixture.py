"""Mixture + export throughput on a file store.

Inputs: real MedQA question texts (shared data), each made unique per copy, with SAMPLES accepted
traces per question of ~REASONING_WORDS words written in SAMPLE_SCHEMA. Reports the median of
--repeats runs of build_mixture (small buckets, so the bucketed path is exercised) and of the
LLaMA-Factory + TRL export.

    .venv/bin/python benchmarks/bench_mixture.py --questions 2000 --samples 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from octomed_data import storage
from octomed_data.export import export
from octomed_data.mixture import MixtureConfig, build_mixture
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, question_row

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def make_inputs(root: str, n_questions: int, samples: int, words: int) -> tuple[str, str]:
    base = [
        json.loads(line)
        for line in open(SHARED / "medqa" / "phrases_no_exclude_test.jsonl", encoding="utf-8")
    ]
    questions, traces = [], []
    filler = ("the patient presents with findings consistent with the diagnosis " * (words // 9 + 1)).split()[
        :words
    ]
    for i in range(n_questions):
        rec = base[i % len(base)]
        q = question_row(
            source=f"src{i % 4}",
            split="train",
            task_type="text_mcq",
            question=f"{rec['question']} (case {i})",
            options=rec["options"],
            answer=rec["answer_idx"],
            input_file="bench",
            record_index=i,
        )
        questions.append(q)
        for k in range(samples):
            traces.append(
                {
                    "question_id": q["question_id"],
                    "source": q["source"],
                    "task_type": q["task_type"],
                    "sample_idx": k,
                    "seed": k,
                    "teacher": "bench",
                    "model": "bench",
                    "prompt_version": "1",
                    "params_hash": "x",
                    "reasoning": " ".join(filler) + f" {k}",
                    "gold_answer": q["answer"],
                    "response": f"Final answer: \\boxed{{{q['answer']}}}",
                    "extracted_answer": q["answer"],
                    "correct": True,
                }
            )
    qds = storage.Dataset(storage.join(root, "questions"), QUESTION_SCHEMA)
    for s in range(0, len(questions), 5000):
        qds.write_shard(s // 5000, questions[s : s + 5000])
    ads = storage.Dataset(storage.join(root, "accepted"), SAMPLE_SCHEMA)
    for s in range(0, len(traces), 5000):
        ads.write_shard(s // 5000, traces[s : s + 5000])
    return ads.uri, qds.uri


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--questions", type=int, default=2000)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--words", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        accepted, questions = make_inputs(tmp, args.questions, args.samples, args.words)
        n = args.questions * args.samples
        mix_t, exp_t = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            res = build_mixture(accepted, questions, f"{tmp}/mix{r}", MixtureConfig(bucket_rows=4000))
            mix_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            export(res.uri, f"{tmp}/exp{r}")
            exp_t.append(time.perf_counter() - t0)
        m, e = statistics.median(mix_t), statistics.median(exp_t)
        print(
            f"traces={n} mixture median {m:.2f}s ({n / m:,.0f} traces/s); "
            f"export (llamafactory+trl) median {e:.2f}s ({n / e:,.0f} rows/s); runs={args.repeats}"
        )


if __name__ == "__main__":
    main()
