"""The mixture's seeded choices: hashes, duplicates, weights, the question-level split and its strata.

Every choice is a hash of (seed, content), so the same inputs and seed give the same mixture on any
machine and with any bucket count."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from octomed_data.mixture_config import MixtureConfig, SourceCounts
from octomed_data.schema import normalize_text

TWO64 = float(2**64)


def h64(*parts: object) -> int:
    """Seeded, platform-independent 64-bit hash (Python's ``hash`` is salted per process)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode("utf-8"))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "big")


def dedupe_key(question_id: str, reasoning: str | None, response: str | None) -> str:
    """Two traces are duplicates when they answer the same question with the same normalised text."""
    text = normalize_text(reasoning or "").lower() + "\x1e" + normalize_text(response or "").lower()
    return hashlib.blake2b(f"{question_id}\x1f{text}".encode(), digest_size=12).hexdigest()


def split_of(question_id: str, seed: int, validation_fraction: float) -> str:
    """Train or validation, decided by the question alone so no question lands in both."""
    return "validation" if h64(seed, "split", question_id) / TWO64 < validation_fraction else "train"


@dataclass
class Stratum:
    """Split statistics of one (source, task type): counts and the questions a move would take."""

    train: int = 0
    validation: int = 0
    train_lowest: tuple[int, str] | None = None  # (split hash, question_id)
    validation_highest: tuple[int, str] | None = None

    def add(self, question_id: str, split: str, seed: int) -> None:
        key = (h64(seed, "split", question_id), question_id)
        if split == "train":
            self.train += 1
            if self.train_lowest is None or key < self.train_lowest:
                self.train_lowest = key
        else:
            self.validation += 1
            if self.validation_highest is None or key > self.validation_highest:
                self.validation_highest = key


def stratified_moves(strata: dict[tuple[str, str], Stratum]) -> dict[str, str]:
    """question_id -> split for the questions that give each stratum a question in both splits."""
    moves: dict[str, str] = {}
    for stats in strata.values():
        if stats.validation == 0 and stats.train >= 2 and stats.train_lowest:
            moves[stats.train_lowest[1]] = "validation"
        elif stats.train == 0 and stats.validation >= 2 and stats.validation_highest:
            moves[stats.validation_highest[1]] = "train"
    return moves


def copies_for(weight: float, priority: float) -> int:
    """How many copies of a trace a weight asks for; ``priority`` in [0,1) decides the fraction."""
    whole = math.floor(weight)
    return whole + (1 if priority < weight - whole else 0)


def bucket_candidates(
    rows: list[dict[str, Any]], config: MixtureConfig, counts: dict[str, SourceCounts]
) -> list[tuple[dict[str, Any], float, int]]:
    """Dedupe, per-question limit and weights for one bucket: (row, priority, copies) per candidate.

    Deterministic in the rows alone, so the select pass can recompute it after the cap pass.
    ``counts`` is updated only when given a fresh dict (the caller decides which pass counts).
    """
    rows = sorted(rows, key=lambda r: (r["question_id"], r["teacher"], r["model"], r["sample_idx"]))
    seen: set[str] = set()
    per_question: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
    for row in rows:
        if row["dedupe_key"] in seen:
            counts[row["source"]].duplicates += 1
            continue
        seen.add(row["dedupe_key"])
        priority = h64(config.seed, "pick", row["dedupe_key"]) / TWO64
        per_question[row["question_id"]].append((priority, row))
    out: list[tuple[dict[str, Any], float, int]] = []
    for items in per_question.values():
        items.sort(key=lambda t: t[0])
        if config.max_traces_per_question is not None:
            for _, row in items[config.max_traces_per_question :]:
                counts[row["source"]].over_question_limit += 1
            items = items[: config.max_traces_per_question]
        for priority, row in items:
            n = copies_for(config.weight(row["source"]), priority)
            if n == 0:
                counts[row["source"]].dropped_by_weight += 1
                continue
            out.append((row, priority, n))
    return out


def within_cap(cap: int, priority: float, threshold: float) -> bool:
    return cap > 0 and priority <= threshold
