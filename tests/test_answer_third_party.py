"""THE extractor on REAL model replies with the label each reply states (third-party corpus, tests split).

The replies are public model outputs on medical multiple-choice benchmarks (MMLU-Pro health,
MedQA, MedMCQA, MMLU-medical, PubMedQA, MetaMedQA), each with the authors' published label;
``expected`` is the label the reply states as its final answer (adjudicated where the published
label and THE extractor disagreed), see ``tests/answer_corpus/third_party/SOURCES.md``. Only the
families of the ``tests`` split are read here; the ``heldout`` families are for
``benchmarks/bench_answers.py --third-party`` alone.

Thresholds: (a) no reply read as another answer than the one it states; (b) at most 0.1% of the
rows read as an answer where the reply states none; (c) at least 97% of the replies that state an
answer read as that answer.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from octomed_data.answers import extract_answer, is_correct

_spec = importlib.util.spec_from_file_location(
    "third_party_corpus", Path(__file__).parent / "answer_corpus" / "third_party.py"
)
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)


@pytest.fixture(scope="module")
def readings() -> list[tuple[dict, str | None]]:
    rows = corpus.rows("tests")
    return [(r, extract_answer(r["reply"], r["task_type"], corpus.options(r)).answer) for r in rows]


def _show(items: list[tuple[dict, str | None]], n: int = 8) -> str:
    return "\n".join(
        f"{r['id']}: expected {r['expected']!r}, read {got!r}: …{r['reply'][-160:]!r}" for r, got in items[:n]
    )


def test_corpus_shape() -> None:
    """The split is what the benchmark and the thresholds assume: real rows, several families."""
    rows = corpus.rows("tests")
    heldout = corpus.rows("heldout")
    assert len(rows) >= 2000 and len(heldout) >= 1000
    assert len({r["id"] for r in rows + heldout}) == len(rows) + len(heldout)
    families = Counter(r["family"] for r in rows)
    assert len(families) >= 4, families
    assert not set(families) & {r["family"] for r in heldout}, "a family is in both splits"
    for r in rows:
        assert r["source"].count("@") == 1 and ":" in r["source"].split("@")[1], r["source"]
        assert r["licence"] and r["reply"] is not None
        labels = [k for k, _ in r["options"]]
        if r["expected"] is not None and r["task_type"] != "yes_no_maybe":
            assert r["expected"] in labels, r["id"]
        if r["adjudicated"]:
            assert r["note"] and r["adjudicated_by"] in ("hand", "rule"), r["id"]
        else:
            assert r["expected"] == r["published"], r["id"]


def test_no_misread(readings) -> None:
    """(a) zero tolerance: a reply that states an answer is never read as another answer."""
    bad = [
        (r, got)
        for r, got in readings
        if r["expected"] is not None
        and got is not None
        and not is_correct(got, r["expected"], r["task_type"])
    ]
    assert not bad, f"{len(bad)} replies read as another answer than they state:\n{_show(bad)}"


def test_false_accepts_at_most_a_tenth_of_a_percent(readings) -> None:
    """(b) a reply that states no answer (or several, or is cut off) is read as nothing."""
    bad = [(r, got) for r, got in readings if r["expected"] is None and got is not None]
    assert len(bad) <= 0.001 * len(readings), (
        f"{len(bad)} of {len(readings)} replies that state no answer were read as one:\n{_show(bad)}"
    )


def test_read_rate_at_least_97_percent(readings) -> None:
    """(c) the replies that state an answer are read as that answer."""
    stated = [(r, got) for r, got in readings if r["expected"] is not None]
    unread = [(r, got) for r, got in stated if got is None]
    ok = sum(got is not None and is_correct(got, r["expected"], r["task_type"]) for r, got in stated)
    assert ok >= 0.97 * len(stated), f"read {ok}/{len(stated)}; unread examples:\n{_show(unread)}"
