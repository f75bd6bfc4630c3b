"""How far to trust the LLM judge: its agreement with exact match where the truth is known.

On closed questions (multiple choice, yes/no/maybe) exact match of the extracted answer is the
truth. Judging a bounded sample of those replies as if they were open-ended and comparing says how
the judge errs: **precision** (of the replies it calls correct, the share that are), **recall** (of
the correct replies, the share it calls correct), **agreement** (share of equal verdicts) and
Cohen's **kappa** (agreement beyond chance) and the **false-accept rate** (of the replies exact
match rejects, the share the judge accepts: fp / (fp + tn)). A judge with low precision lets wrong
traces into the training data; low recall only costs traces.

Precision depends on how many replies are right, which differs between closed and open questions;
the false-accept rate is a property of the judge on wrong answers alone, so it is the number that
carries over to the open-ended answers it decides: of the wrong open answers it sees, about that
share is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Calibration:
    """Counts of (exact-match verdict, judge verdict) pairs; :meth:`summary` gives the rates."""

    tp: int = 0  # both correct
    fp: int = 0  # judge correct, exact match wrong
    fn: int = 0  # judge wrong, exact match correct
    tn: int = 0  # both wrong

    def add(self, exact: bool, judge: bool) -> None:
        if judge:
            self.tp += exact
            self.fp += not exact
        else:
            self.fn += exact
            self.tn += not exact

    def merge(self, other: Calibration) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.tn += other.tn

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def summary(self) -> dict[str, Any]:
        """Counts and rates (None where a rate has no denominator), rounded to 4 places."""
        n = self.n

        def rate(num: int, den: int) -> float | None:
            return round(num / den, 4) if den else None

        kappa = None
        if n:
            observed = (self.tp + self.tn) / n
            p_judge, p_exact = (self.tp + self.fp) / n, (self.tp + self.fn) / n
            chance = p_judge * p_exact + (1 - p_judge) * (1 - p_exact)
            kappa = round((observed - chance) / (1 - chance), 4) if chance < 1 else None
        return {
            "judged": n,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "precision": rate(self.tp, self.tp + self.fp),
            "recall": rate(self.tp, self.tp + self.fn),
            "agreement": rate(self.tp + self.tn, n),
            "kappa": kappa,
            "false_accept_rate": rate(self.fp, self.fp + self.tn),
        }
