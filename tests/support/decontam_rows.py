"""Row builders shared by the decontamination tests (question rows as ingest writes them)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from octomed_data import storage
from octomed_data.decontam import tokens
from octomed_data.images import fingerprint
from octomed_data.schema import QUESTION_SCHEMA, TaskType, question_row

VQA_IMAGE = "vqa_rad/images/synpic16174.jpg"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def image_ref(img: Image.Image) -> dict:
    _, sha, ph = fingerprint(img)
    return {"sha256": sha, "uri": f"images/{sha}.png", "phash": ph, "width": img.width, "height": img.height}


def make_row(
    question: str, options: list[str] | None = None, images: list[dict] | None = None, i: int = 0
) -> dict:
    """A question row as ingest would write it (multiple choice when options are given)."""
    if images:
        task = TaskType.MM_MCQ if options else TaskType.OPEN_VQA
    else:
        task = TaskType.TEXT_MCQ if options else TaskType.OPEN_QA
    return question_row(
        source="train-set",
        split="train",
        task_type=task,
        question=question,
        options={chr(65 + k): o for k, o in enumerate(options or [])},
        answer="A" if options else "some answer",
        images=images or (),
        input_file="train.jsonl",
        record_index=i,
    )


def perturb(text: str, every: int = 10, word: str = "blue") -> str:
    """Replace every ``every``-th token with a real (in-vocabulary) word: no 16-token run survives."""
    toks = tokens(text)
    return " ".join(word if k % every == every - 1 else t for k, t in enumerate(toks))


def write_mixed_questions(uri: str, medqa: list[dict]) -> tuple[set[str], set[str]]:
    """Three shards: exact benchmark copies interleaved with perturbed (clean) versions."""
    ds = storage.Dataset(uri, QUESTION_SCHEMA)
    dirty, clean = set(), set()
    for shard in range(3):
        rows = []
        for k in range(shard * 40, shard * 40 + 40):
            rec = medqa[k]
            if k % 4 == 0:
                row = make_row(rec["question"], list(rec["options"].values()), i=k)
                dirty.add(row["question_id"])
            else:
                row = make_row(perturb(rec["question"]), list(rec["options"].values()), i=k)
                clean.add(row["question_id"])
            rows.append(row)
        ds.write_shard(shard, rows)
    return dirty, clean
