"""SFT and evaluation throughput of the tiny models on CPU (a pipeline-overhead measure, not GPU speed).

    .venv/bin/python benchmarks/bench_training.py                  # medians of 3
    .venv/bin/python benchmarks/bench_training.py --repeats 1 --steps 10

Training rows are real MedQA test questions (text only: a CPU pipeline measure, never a training
set) with a synthetic ``<think>`` trace, prompted as evaluation prompts them. Measures

* tokenisation (export row -> input_ids/labels with assistant-only labels), rows/s, in process;
* SFT with DeepSpeed ZeRO-3 through ``python -m training.sft`` in a fresh process per repeat:
  wall time of the whole command, training-loop steps/s and samples/s (Trainer's train_runtime);
* evaluation (greedy generation + answer extraction + metrics), questions/s, in process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from evaluation.harness import chat_messages, evaluate  # noqa: E402
from octomed_data import storage  # noqa: E402
from octomed_data.export import LLAMAFACTORY_SCHEMA  # noqa: E402
from octomed_data.job_config import EvalConfig  # noqa: E402
from octomed_data.schema import QUESTION_SCHEMA, question_row  # noqa: E402
from training.data import RowEncoder  # noqa: E402
from training.tiny import build_text_model  # noqa: E402


def medqa_questions(shared: Path, n: int) -> list[dict]:
    rows = []
    with open(shared / "medqa" / "phrases_no_exclude_test.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= n:
                break
            rec = json.loads(line)
            rows.append(
                question_row(
                    source="medqa",
                    split="test",
                    task_type="text_mcq",
                    question=rec["question"],
                    options=rec["options"],
                    answer=rec["answer_idx"],
                    input_file="phrases_no_exclude_test.jsonl",
                    record_index=i,
                )
            )
    return rows


def conversation(q: dict) -> dict:
    trace = f"<think>\nThe question describes: {q['question'][:600]}\n</think>\n\nFinal answer: \\boxed{{{q['answer']}}}"
    return {
        "messages": chat_messages(q) + [{"role": "assistant", "content": trace}],
        "images": [],
        "question_id": q["question_id"],
        "source": q["source"],
        "teacher": "bench",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (one process)")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--eval-questions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    shared = Path(os.environ.get("OCTOMED_SHARED_DATA", REPO.parent / "shared" / "data"))

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        tmp_path = Path(tmp)
        model = build_text_model(tmp_path / "model", hidden_size=args.hidden, num_layers=args.layers)
        questions = medqa_questions(shared, max(args.rows, args.eval_questions))
        export = storage.Dataset(str(tmp_path / "export"), LLAMAFACTORY_SCHEMA)
        export.write_shard(0, [conversation(q) for q in questions[: args.rows]])

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
        encoder = RowEncoder(tok, args.max_seq_len, multimodal=False)
        rows = export.read_all().to_pylist()
        tokenize, lengths = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = [encoder(r) for r in rows]
            tokenize.append(len(rows) / (time.perf_counter() - t0))
        lengths = sorted(len(o["input_ids"]) for o in out)

        cfg = {
            "train_data": [export.uri],
            "model_path": str(model),
            "output_uri": str(tmp_path / "ckpt"),
            "global_batch_size": args.batch,
            "per_device_batch_size": args.batch,
            "max_steps": args.steps,
            "max_seq_len": args.max_seq_len,
            "zero_stage": 3,
            "logging_steps": args.steps,
            "resume": False,
        }
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        walls, steps_s, samples_s = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "training.sft",
                    "--config",
                    str(tmp_path / "train.yaml"),
                    "--no-progress",
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
            )
            walls.append(time.perf_counter() - t0)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            steps_s.append(res["steps"] / res["train_runtime_s"])
            samples_s.append(res["samples_seen"] / res["train_runtime_s"])

        qds = storage.Dataset(str(tmp_path / "questions"), QUESTION_SCHEMA)
        qds.write_shard(0, questions[: args.eval_questions])
        eval_qps = []
        for _ in range(args.repeats):
            ev = evaluate(
                EvalConfig(
                    checkpoint_uri=str(tmp_path / "ckpt"),
                    questions_uri=qds.uri,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=8,
                    seeds=1,
                    temperature=0.0,  # greedy: the same work as before the protocol defaults existed
                ),
                progress=False,
            )
            eval_qps.append(ev.predictions / ev.runtime_s)

    report = {
        "model": f"tiny qwen2 hidden={args.hidden} layers={args.layers}",
        "rows": args.rows,
        "tokens_per_row_median": lengths[len(lengths) // 2],
        "tokenize_rows_per_s": round(statistics.median(tokenize), 1),
        "sft_zero3_command_wall_s": round(statistics.median(walls), 2),
        "sft_steps_per_s": round(statistics.median(steps_s), 2),
        "sft_samples_per_s": round(statistics.median(samples_s), 1),
        "sft_global_batch": args.batch,
        "eval_questions_per_s": round(statistics.median(eval_qps), 2),
        "eval_max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
