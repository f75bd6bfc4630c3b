"""Loader for the third-party answer corpus: real model replies with the label each one states.

``tests/answer_corpus/third_party/{tests,heldout}.jsonl.gz`` (built by
``benchmarks/build_answer_corpus.py``; provenance and licences in ``third_party/SOURCES.md``). The
``tests`` split holds the model families the test suite sees; ``heldout`` holds families only the
benchmark reads (``benchmarks/bench_answers.py --third-party``), to check that the extractor
generalises to families nobody tuned it on.

Each row: ``id``, ``source`` (repo@commit:path), ``licence``, ``model``, ``family``, ``benchmark``,
``task_type``, ``options`` ([[label, text], ...]), ``gold``, ``reply`` (verbatim), ``published`` (the
authors' parsed label, or ``None``), ``published_how``, ``expected`` (the answer the reply states as
its final answer, in the extractor's answer space: a label, or yes/no/maybe; ``None`` when it states
none, several, contradicts itself or is cut off inside ``<think>``), ``adjudicated`` (+ ``adjudicated_by``
hand|rule and ``note`` when ``expected`` was decided by reading the reply rather than taken from an
agreeing published label).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

DIR = Path(__file__).parent / "third_party"
SPLITS = ("tests", "heldout")


def rows(split: str) -> list[dict]:
    """All rows of one split, in file order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    return list(_read(DIR / f"{split}.jsonl.gz"))


def _read(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def options(row: dict) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in row["options"]]
