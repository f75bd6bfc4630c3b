"""Synthetic mixture inputs: questions with short or R1-length accepted traces, at any count."""

from __future__ import annotations

from collections.abc import Callable

from octomed_data import storage


def accepted_inputs(
    root: str, n_questions: int, samples: int, reasoning: Callable[[int, int], str], rows_per_shard: int
) -> tuple[str, str]:
    """``n_questions`` questions (sources src0..src2) with ``samples`` accepted traces each, whose
    reasoning is ``reasoning(question_index, sample_index)``, written ``rows_per_shard`` traces a shard.
    Returns the accepted and questions URIs."""
    from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, question_row

    questions, traces = [], []
    for i in range(n_questions):
        q = question_row(
            source=f"src{i % 3}", split="train", task_type="text_mcq", question=f"Which one? case {i}",
            options={"A": "a", "B": "b"}, answer="A", input_file="t", record_index=i,
        )  # fmt: skip
        questions.append(q)
        for k in range(samples):
            traces.append(
                {
                    "question_id": q["question_id"], "source": q["source"], "task_type": q["task_type"],
                    "sample_idx": k, "seed": k, "teacher": "t", "model": "m", "prompt_version": "1",
                    "params_hash": "x", "reasoning": reasoning(i, k), "gold_answer": "A",
                    "response": "Final answer: \\boxed{A}", "extracted_answer": "A", "correct": True,
                }
            )  # fmt: skip
    storage.Dataset(f"{root}/questions", QUESTION_SCHEMA).write_shard(0, questions)
    accepted = storage.Dataset(f"{root}/accepted", SAMPLE_SCHEMA)
    for start in range(0, len(traces), rows_per_shard):
        accepted.write_shard(start // rows_per_shard, traces[start : start + rows_per_shard])
    return f"{root}/accepted", f"{root}/questions"
