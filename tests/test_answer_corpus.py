"""The answer-extraction regression corpus (issue 13): every reply reads as recorded.

A false accept (an answer where a rejection is expected, or a different answer) fails, and so does
a rejection where an answer is expected or a rejection for a different reason.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from octomed_data.answers import extract_answer

_spec = importlib.util.spec_from_file_location(
    "answer_corpus", Path(__file__).parent / "answer_corpus" / "corpus.py"
)
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)
ROWS = corpus.ROWS


def test_corpus_size_and_coverage() -> None:
    assert len(ROWS) >= 200
    assert len({r["id"] for r in ROWS}) == len(ROWS)
    forms = Counter(r["form"] for r in ROWS)
    for form in (
        "label_comma_text",
        "label_dash_text",
        "label_or_text",
        "label_quoted_text",
        "label_text_conflict",
        "hedge",
        "failed_final_statement",
        "r1_ending",
        "ynm_label_comma",
    ):
        assert forms[form] >= 3, forms
    assert {r["task_type"] for r in ROWS} == {"text_mcq", "yes_no_maybe"}


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_corpus_row(row: dict) -> None:
    got = extract_answer(row["reply"], row["task_type"], [tuple(o) for o in row["options"]])
    assert got.answer == row["expected_answer"], (row["form"], row["reply"], got)
    if row["expected_answer"] is None:
        assert got.reason == row["expected_reason"], (row["form"], row["reply"], got)
