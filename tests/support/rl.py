"""A tiny filtered run for the RL data tests: questions, verdicts with known pass rates, removed items.

Texts are invented medical questions (no benchmark holds them) plus, where asked, real MedQA test
items (the bundled registry holds them: the RL data must leave them out). Images are small PNGs
drawn here and stored as ingestion stores them (content address, perceptual hash).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from octomed_data import storage
from octomed_data.images import fingerprint, open_raster
from octomed_data.layout import RunPaths
from octomed_data.rejection import FAILED
from octomed_data.schema import QUESTION_SCHEMA, REMOVED_SCHEMA, VERDICT_SCHEMA, question_row
from tests.support.orchestration import real_mcqs

ORGANS = ["liver", "kidney", "spleen", "pancreas", "thyroid", "adrenal gland", "gallbladder", "bladder"]


def text_question(i: int, source: str = "synthetic_mcq") -> dict[str, Any]:
    organ = ORGANS[i % len(ORGANS)]
    return question_row(
        source=source,
        split="train",
        task_type="text_mcq",
        question=f"Invented case {i}: a patient with the fictional syndrome Quorvath-{i} shows signs "
        f"in the {organ}. Which fictional agent number {i * 7 + 3} is used first?",
        options={"A": f"Zentral-{i}", "B": f"Morvex-{i}", "C": f"Platrine-{i}", "D": f"Oxabel-{i}"},
        answer="ABCD"[i % 4],
        input_file="synthetic.jsonl",
        record_index=i,
    )


def open_question(i: int, source: str = "synthetic_open") -> dict[str, Any]:
    return question_row(
        source=source,
        split="train",
        task_type="open_qa",
        question=f"Invented case {i}: which fictional organ called the Vellum-{i} filters the blue humour?",
        answer=f"vellum gland {i}",
        input_file="synthetic.jsonl",
        record_index=100 + i,
    )


def stored_image(root: str, i: int) -> dict[str, Any]:
    """A small drawn PNG stored under ``root/images`` as ingestion stores images."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (64, 64), color=20 + 9 * i)
    draw = ImageDraw.Draw(img)
    draw.rectangle([4 + i, 6, 30 + 2 * i, 40 - i], fill=220)
    draw.ellipse([36, 10 + i, 60, 50], fill=120 + 5 * i)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = Path(root) / f"drawn-{i}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    data, sha, ph = fingerprint(open_raster(str(path)))
    uri = storage.join(root, "images", f"{sha}.png")
    storage.write_bytes(uri, data)
    return {"sha256": sha, "uri": uri, "phash": ph, "width": 64, "height": 64}


def image_question(i: int, root: str, source: str = "synthetic_vqa") -> dict[str, Any]:
    return question_row(
        source=source,
        split="train",
        task_type="mm_mcq",
        question=f"Invented figure {i}: which fictional structure is drawn? Note the <image> marker.",
        options={"A": "Orbex", "B": "Tallin", "C": "Wenmark"},
        answer="B",
        input_file="synthetic_vqa.json",
        record_index=200 + i,
        images=[stored_image(root, i)],
    )


def benchmark_questions(shared_data: Path, n: int = 1) -> list[dict[str, Any]]:
    """Real MedQA test items (the registry matches them), as a source would ingest them."""
    return [
        question_row(
            source="medqa_train_copy",
            split="train",
            task_type="text_mcq",
            question=rec["question"],
            options=rec["options"],
            answer=rec["answer_idx"],
            input_file="medqa.jsonl",
            record_index=300 + i,
        )
        for i, rec in enumerate(real_mcqs(shared_data, n))
    ]


def verdict_rows(q: dict[str, Any], judged: int, accepted: int, failed: int = 0) -> list[dict[str, Any]]:
    """``judged`` verdicts (``accepted`` correct) plus ``failed`` failed requests, as the filter writes them."""
    rows = []
    for k in range(judged + failed):
        ok = k < accepted
        fail = k >= judged
        rows.append(
            {
                "question_id": q["question_id"],
                "source": q["source"],
                "task_type": q["task_type"],
                "sample_idx": k,
                "teacher": "sandbox",
                "model": "sandbox-echo",
                "extracted_answer": None if fail else (q["answer"] if ok else "wrong"),
                "extraction_method": None if fail else "boxed",
                "gold_answer": q["answer"],
                "correct": ok and not fail,
                "reject_reason": FAILED if fail else (None if ok else "wrong_answer"),
                "finish_reason": None if fail else "stop",
                "reasoning_chars": 10,
                "reasoning_words": 2,
                "prompt_tokens": 5,
                "completion_tokens": 5,
                "verifier": None if fail else "exact",
                "verifier_rule": "exact" if ok and not fail else None,
                "judge_correct": None,
            }
        )
    return rows


def write_rl_run(
    paths: RunPaths,
    shards: Sequence[Sequence[tuple[dict[str, Any], int, int]]],
    *,
    removed: Sequence[dict[str, Any]] = (),
    failed: int = 0,
) -> None:
    """One questions shard (and its verdicts shard) per entry of ``shards``: (question, judged, accepted)
    per question; ``removed``: questions decontamination removed (not in ``questions``)."""
    questions = storage.Dataset(paths.questions, QUESTION_SCHEMA)
    verdicts = storage.Dataset(paths.verdicts, VERDICT_SCHEMA)
    for n, items in enumerate(shards):
        questions.write_shard(n, [q for q, _, _ in items])
        rows = [r for q, judged, acc in items for r in verdict_rows(q, judged, acc, failed)]
        verdicts.write_shard(n, rows)
    gone = [
        q | {"match_kind": "text_ngram", "match_benchmark": "medqa", "match_item": "x", "match_detail": None}
        for q in removed
    ]
    storage.Dataset(paths.removed, REMOVED_SCHEMA).write_shard(0, gone)
