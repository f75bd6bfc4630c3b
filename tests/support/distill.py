"""Synthetic questions, a sandbox teacher config and the raw replies, for the distillation,
inference and cluster tests."""

from __future__ import annotations

from octomed_data import storage
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, question_row
from octomed_data.teachers import DistillConfig

KEY = "sk-test-DO-NOT-LEAK-4f1c9a7b2e"


DRUGS = ["Metformin", "Insulin glargine", "Glipizide", "Sitagliptin", "Pioglitazone"]


def make_questions(
    uri: str, n: int, shard: str = "00000", source: str = "medqa", offset: int = 0
) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        k = 2 + i % 4  # 2..5 options: pass rates differ per question
        opts = {chr(65 + j): DRUGS[j] for j in range(k)}
        rows.append(
            question_row(
                source=source,
                split="train",
                task_type="text_mcq",
                question=f"Case {i}: a 5{i % 10}-year-old with new type 2 diabetes. First-line drug?",
                answer=chr(65 + i % k),
                input_file="synthetic",
                record_index=i,
                options=opts,
            )
        )
    storage.Dataset(uri, QUESTION_SCHEMA).write_shard(shard, rows)
    return rows


def config(base_url: str, **over) -> DistillConfig:
    teacher = {"name": "sandbox", "base_url": base_url, "model": "sandbox-r1", "max_in_flight": 16}
    teacher.update(over.pop("teacher", {}))
    data = {
        "teachers": [teacher],
        "samples": 4,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.2,
        "flush_interval_s": 0.05,
        "flush_every": 32,
    }
    data.update(over)
    return DistillConfig.parse(data)


def read_raw(out: str, q_uri: str | None = None):
    """The raw replies; with ``q_uri``, judged by the filter stage (verdict columns filled in)."""
    rows = storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_all().to_pylist()
    if q_uri is None:
        return rows
    from octomed_data.schema import VERDICT_SCHEMA
    from octomed_data.stages.distill_run import finalize

    finalize(out, q_uri)
    verdicts = storage.Dataset(storage.join(out, "verdicts"), VERDICT_SCHEMA).read_all().to_pylist()
    by_key = {(v["question_id"], v["sample_idx"]): v for v in verdicts}
    assert len(by_key) == len(rows)
    for r in rows:
        v = by_key[(r["question_id"], r["sample_idx"])]
        r.update({k: v[k] for k in ("extracted_answer", "extraction_method", "correct", "reject_reason")})
    return rows
