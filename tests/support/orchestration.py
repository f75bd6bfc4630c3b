"""Test inputs for mixture/export/report tests: real question text, images from the shared data.

Questions come from real benchmark files (the texts only matter as realistic payloads here);
accepted samples are written in SAMPLE_SCHEMA exactly as the distillation stage writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from octomed_data import storage
from octomed_data.images import fingerprint, open_raster
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, question_row


def real_mcqs(shared_data: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` MedQA records (question + options + answer index)."""
    out = []
    with open(shared_data / "medqa" / "phrases_no_exclude_test.jsonl", encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def write_inputs(
    shared_data: Path,
    root: str,
    *,
    n_text: int = 12,
    n_image: int = 3,
    traces_per_question: int = 3,
    literal_image_token: bool = True,
) -> tuple[str, str]:
    """Write a questions dataset and an accepted-samples dataset under ``root``; return their URIs."""
    questions: list[dict[str, Any]] = []
    for i, rec in enumerate(real_mcqs(shared_data, n_text)):
        questions.append(
            question_row(
                source="medqa",
                split="train",
                task_type="text_mcq",
                question=rec["question"],
                options=rec["options"],
                answer=rec["answer_idx"],
                input_file="medqa.jsonl",
                record_index=i,
            )
        )
    image_files = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[:n_image]
    for i, path in enumerate(image_files):
        data, sha, ph = fingerprint(open_raster(str(path)))
        uri = storage.join(root, "images", f"{sha}.png")
        storage.write_bytes(uri, data)
        image = {"sha256": sha, "uri": uri, "phash": ph, "width": 8, "height": 8}
        questions.append(
            question_row(
                source="vqa_rad",
                split="train",
                task_type="mm_mcq",
                question=f"Which structure is shown in this image? Note the <image> marker {i}.",
                options={"A": "Lung", "B": "Brain", "C": "Liver"},
                answer="B",
                input_file="vqa_rad.json",
                record_index=i,
                images=[image],
            )
        )
    q_uri = storage.join(root, "questions")
    storage.Dataset(q_uri, QUESTION_SCHEMA).write_shard(0, questions)
    samples = []
    for q in questions:
        for k in range(traces_per_question):
            reasoning = f"Step by step for {q['question_id']} variant {k % 2}."
            if literal_image_token and q["source"] == "vqa_rad":
                reasoning += " The <image> shows a brain."
            samples.append(
                {
                    "question_id": q["question_id"],
                    "source": q["source"],
                    "task_type": q["task_type"],
                    "sample_idx": k,
                    "seed": k,
                    "teacher": "sandbox",
                    "model": "sandbox-echo",
                    "prompt_version": "1",
                    "params_hash": "x",
                    "reasoning": reasoning,
                    "response": f"The answer is {q['answer']}.",
                    "extracted_answer": q["answer"],
                    "gold_answer": q["answer"],
                    "correct": True,
                    "created_at": None,
                }
            )
        # one rejected sample per question: must never enter a mixture
        samples.append(
            samples[-1] | {"sample_idx": 99, "correct": False, "reasoning": "wrong", "extracted_answer": "Z"}
        )
    a_uri = storage.join(root, "accepted")
    half = len(samples) // 2
    ds = storage.Dataset(a_uri, SAMPLE_SCHEMA)
    ds.write_shard(0, samples[:half])
    ds.write_shard(1, samples[half:])
    return a_uri, q_uri
