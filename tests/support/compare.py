"""Prediction rows written by hand for the lab's comparison tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from octomed_data import storage
from octomed_data.experiment.compare import arm_metrics
from octomed_data.schema import PREDICTION_SCHEMA, QUESTION_SCHEMA, question_row

TASK = {"medqa": "text_mcq", "vqa_rad": "yes_no_maybe"}  # VQA-RAD closed questions: yes/no WITH an image


def write_predictions(uri: str, correct: dict[tuple[str, int], list[bool]], tokens: dict[str, int]) -> str:
    rows = []
    for (bench, seed), hits in correct.items():
        for i, ok in enumerate(hits):
            rows.append(
                {
                    "question_id": f"{bench}-{i}",
                    "source": bench,
                    "task_type": TASK[bench],
                    "gold_answer": "A",
                    "correct": bool(ok),
                    "reasoning_tokens": tokens[bench],
                    "think_closed": True,
                    "completion_tokens": tokens[bench] + 5,
                    "finish_reason": "stop",
                    "benchmark": bench,
                    "seed": seed,
                }  # fmt: skip
            )
    storage.Dataset(uri, PREDICTION_SCHEMA).write_shard(
        0, pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
    )
    return uri


def write_questions(uri: str, n: dict[str, int]) -> str:
    """The evaluated questions: VQA-RAD's with an image (multimodal whatever the task type)."""
    image = {"sha256": "0" * 64, "uri": "x.png", "phash": 0, "width": 8, "height": 8}
    rows = []
    for bench, count in n.items():
        for i in range(count):
            extra = {"options": {"A": "aspirin", "B": "heparin"}, "answer": "A"} if bench == "medqa" else {}
            extra = extra or {"answer": "yes", "images": [image]}
            row = question_row(
                source=bench, split="test", task_type=TASK[bench], question=f"{bench} {i}?",
                input_file="x", record_index=i, **extra,
            )  # fmt: skip
            rows.append(row | {"question_id": f"{bench}-{i}"})
    storage.Dataset(uri, QUESTION_SCHEMA).write_shard(0, pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA))
    return uri


SPEC = {
    "name": "t",
    "base_run": "b",
    "reference": "ref",
    "training": {"max_steps": 1},
    "arms": [{"name": "ref"}, {"name": "x", "samples_per_question": 1}],
    "expect": [
        {"arm": "x", "metric": "medqa", "direction": "down", "paper": "fewer samples are worse"},
        {"arm": "x", "metric": "length:medqa/vqa_rad", "direction": "up", "paper": "longer on text"},
    ],
}


REF = {
    ("medqa", 0): [1, 1, 1, 0],
    ("medqa", 1): [1, 1, 0, 0],
    ("vqa_rad", 0): [1, 0],
    ("vqa_rad", 1): [1, 1],
}


X = {
    ("medqa", 0): [0, 0, 0, 0],
    ("medqa", 1): [1, 0, 0, 0],
    ("vqa_rad", 0): [1, 0],
    ("vqa_rad", 1): [0, 1],
}


def records(tmp_path: Path, ref: dict, x: dict) -> dict:
    questions = write_questions(str(tmp_path / "questions"), {"medqa": 4, "vqa_rad": 2})
    out = {}
    for name, cells in (("ref", ref), ("x", x)):
        uri = write_predictions(
            str(tmp_path / name),
            cells,
            {"medqa": 300 if name == "ref" else 200, "vqa_rad": 40 if name == "ref" else 50},
        )
        out[name] = {
            "status": "COMPLETED",
            "metrics": arm_metrics(uri),
            "data": {"fingerprint": "f1", "traces": 10},
            "evaluation": {"predictions_uri": uri, "questions_uri": questions},
            "train": {"steps": 1, "final_loss": 0.5},
            "trained_by": "ref",
        }  # fmt: skip
    return out
