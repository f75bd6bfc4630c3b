"""THE answer-extraction module: rejection filtering, the verifier and the evaluation harness use it.

:func:`extract_answer` reads the final answer a reply states, and nothing else:

* explicit statements: ``\\boxed{C}``, ``<answer>C</answer>``, a JSON block, "The answer is (C)",
  "Final answer: C", "**Answer: C**"; an answer on the line after a lead-in or a heading ("The
  correct answer is:" / ``### Answer`` then ``(C) MRI brain``); a statement nested in another;
* where no explicit statement is made, implicit ones: a label stated first ("(C) is the correct
  answer"), a last sentence closing on a label, a concluding sentence naming one bracketed label;
  and the reply's last line when it is only an answer, a bold answer anywhere, a bare reply.

The last clear statement wins (a revision: "The answer is B. ... C. Median nerve" reads C). Nothing
is read where no single answer is stated: several labels, two answers side by side with no
revision between them (:func:`.candidates.contradicted`), a hedge, a label and an option text that
disagree, a hypothetical ("if ..., the answer would be B"), or a reply cut off inside ``<think>``.
An unreadable last explicit statement leaves the reply unparsed: it is never handed to an earlier,
perhaps hypothetical, statement (only one that describes the answer, "the answer is clear: ...",
is skipped as prose).

The package: :mod:`.forms` (the patterns), :mod:`.stated` (reading one stated answer),
:mod:`.candidates` (where a reply states answers), this module (weighing them). Tested on real
replies of many model families (``tests/answer_corpus/third_party``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from octomed_data.answers.candidates import Candidate, contradicted, find_candidates
from octomed_data.answers.forms import (
    AMBIGUOUS,
    BOLD,
    BOLD_LEAD,
    BOLD_LINE,
    HEDGE,
    IMPLICIT,
    NO_ANSWER,
    PROSE_REST,
    REFUSAL,
    THINK,
    UNFINISHED_THOUGHT,
)
from octomed_data.answers.stated import (
    clean,
    label_from_text,
    normalize_open,
    parse_choice,
    parse_line,
    parse_open,
    parse_ynm,
)
from octomed_data.schema import TaskType

__all__ = [
    "AMBIGUOUS",
    "METHODS",
    "NO_ANSWER",
    "UNFINISHED_THOUGHT",
    "Extraction",
    "extract_answer",
    "is_correct",
    "looks_like_refusal",
    "normalize_open",
    "token_f1",
]


# Every form an answer is read from (``Extraction.method``), explicit statements first.
METHODS = (
    "boxed",
    "answer_tag",
    "json",
    "statement",
    "heading",
    "bold",
    "bare",
    "last_line",
    "label_first",
    "closing_label",
    "conclusion",
)


@dataclass(frozen=True)
class Extraction:
    """The result of reading a response: an answer, or ``None`` with a reason."""

    answer: str | None
    method: str  # which form was read (one of METHODS), or none
    reason: str | None = None  # no_answer | ambiguous | unfinished_thought when answer is None
    # The stated answer as written (markup stripped, not normalised): "0.5 mg", "X-ray". Open-ended
    # verification reads numbers and units from it, which normalisation would take apart.
    text: str | None = None


def later_bold_disagrees(text: str, cand: Candidate, answer: str, parse) -> bool:
    """Does a later line that is only a bold answer ("**C**") name something else?

    Bold inside prose ("1. **Option A** is wrong") is an explanation, not an answer.
    """
    line_end = text.find("\n", cand.pos)
    if line_end < 0:
        return False
    for line in text[line_end:].splitlines():
        m = BOLD_LINE.match(line.strip())
        if m:
            other = parse(m.group("rest"))[0]
            if other is not None and other != answer:
                return True
    return False


def fallback_lines(text: str) -> list[str]:
    """The last paragraph's non-empty lines: where a bare or bold answer would be."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    if not paragraphs:
        return []
    return [ln.strip() for ln in paragraphs[-1].splitlines() if ln.strip()]


def extract_answer(
    response: str | None, task_type: str | TaskType, options: Sequence[tuple[str, str]] = ()
) -> Extraction:
    """Read the final answer of ``response`` for a question of ``task_type``.

    ``options`` are the question's ``(label, text)`` pairs. Multiple choice returns the label,
    yes/no/maybe returns ``yes``/``no``/``maybe``, open-ended returns :func:`normalize_open` text.
    """
    task = TaskType(task_type)
    if not response or not response.strip():
        return Extraction(None, "none", NO_ANSWER)
    # Inline reasoning is not the answer: only what follows </think> counts.
    text = THINK.sub(" ", response)
    if "</think>" in text.lower():
        text = text[text.lower().rindex("</think>") + len("</think>") :]
    if "<think>" in text.lower():
        # Cut off (or stopped) mid-thought: "the answer is B" there is a step, not a verdict.
        return Extraction(None, "none", UNFINISHED_THOUGHT)
    opts = [(str(k), str(v)) for k, v in options]
    if task.is_multiple_choice:

        def parse(raw: str) -> tuple[str | None, str | None]:
            return parse_choice(raw, opts)
    elif task == TaskType.YES_NO_MAYBE:

        def parse(raw: str) -> tuple[str | None, str | None]:
            return parse_ynm(raw, opts)
    else:

        def parse(raw: str) -> tuple[str | None, str | None]:
            return parse_open(raw, opts)

    closed = task != TaskType.OPEN_QA and task != TaskType.OPEN_VQA
    candidates = find_candidates(text, task, opts)
    explicit = any(c.method not in IMPLICIT for c in candidates)
    for cand in reversed(candidates):
        if explicit and cand.method in ("label_first", "closing_label", "conclusion"):
            continue  # "(C) is correct", "... is (F).": read only where no explicit statement is made
        if cand.ambiguous:  # a lead-in followed by several labelled lines
            return Extraction(None, cand.method, AMBIGUOUS)
        last = cand.method == "last_line"
        # "None of the above" is a hedge unless it is an option's text.
        if HEDGE.match(clean(cand.raw)) and label_from_text(cand.raw, opts) is None:
            if last:
                continue
            return Extraction(None, cand.method, AMBIGUOUS)
        answer, reason = parse_line(cand.raw, task, opts, parse, whole=last) if cand.line else parse(cand.raw)
        if answer is not None:
            if closed and not last and contradicted(text, candidates, cand, answer, parse):
                return Extraction(None, cand.method, AMBIGUOUS)
            if closed and later_bold_disagrees(text, cand, answer, parse):
                # "the answer is B. But wait: **C** ...": a later bold answer retracts it.
                return Extraction(None, cand.method, AMBIGUOUS)
            return Extraction(answer, cand.method, text=clean(cand.raw))
        if last or cand.nested:
            continue  # a last line that is no answer; a nested statement: read the enclosing one
        if reason == AMBIGUOUS or cand.strong:
            return Extraction(None, cand.method, reason)
        if not PROSE_REST.match(clean(cand.raw)):
            # The last explicit statement cannot be read: the reply is unparsed. An earlier
            # statement ("... the answer would be A if ...") is never its verdict.
            return Extraction(None, cand.method, reason)
        # A weak statement that describes the answer ("the answer is clear: ...") is prose.
    if explicit:
        return Extraction(None, "statement", NO_ANSWER)
    return _fallback(text, task, opts, parse)


def _fallback(text: str, task: TaskType, opts: Sequence[tuple[str, str]], parse) -> Extraction:
    lines = fallback_lines(text)
    if not lines:
        return Extraction(None, "none", NO_ANSWER)
    closed = task != TaskType.OPEN_QA and task != TaskType.OPEN_VQA
    bold = [m.group("rest") for ln in lines for m in BOLD.finditer(ln)]
    if bold and closed:
        answers = {parse(b)[0] for b in bold}
        answers.discard(None)
        if len(answers) == 1:
            return Extraction(answers.pop(), "bold")
        if len(answers) > 1:
            return Extraction(None, "bold", AMBIGUOUS)
    if closed:
        # A bold answer anywhere: a line that is only a bold answer, or that opens with one
        # ("**A**, as ..."); read only when every such line names the same answer.
        named: set[str] = set()
        for raw in text.splitlines():
            ln = raw.strip()
            m = BOLD_LINE.match(ln) or BOLD_LEAD.match(ln)
            if m:
                answer, reason = parse_line(m.group("rest"), task, opts, parse)
                if answer is not None:
                    named.add(answer)
        if len(named) == 1:
            return Extraction(named.pop(), "bold")
        if len(named) > 1:
            return Extraction(None, "bold", AMBIGUOUS)
    # A bare answer: the whole response is one short line ("C", "(C) Metformin", "Yes.").
    if len(lines) == 1 and len(text.strip().splitlines()) <= 2:
        line = lines[0]
        if task.is_multiple_choice or task == TaskType.YES_NO_MAYBE or len(line.split()) <= 8:
            answer, reason = parse(line)
            if answer is not None:
                return Extraction(answer, "bare", text=clean(line))
            if reason == AMBIGUOUS:
                return Extraction(None, "bare", AMBIGUOUS)
    return Extraction(None, "none", NO_ANSWER)


def is_correct(extracted: str | None, gold: str, task_type: str | TaskType) -> bool:
    """Exact match of an extracted answer with the gold answer (after the task's normalisation)."""
    if extracted is None or gold is None:
        return False
    task = TaskType(task_type)
    if task.is_multiple_choice:
        return extracted.strip().upper() == gold.strip().upper()
    if task == TaskType.YES_NO_MAYBE:
        return extracted.strip().lower() == gold.strip().lower()
    return normalize_open(extracted) == normalize_open(gold)


def looks_like_refusal(text: str | None) -> bool:
    """A response that declines to answer (checked only when no answer was extracted)."""
    return bool(text) and bool(REFUSAL.search(text or ""))


def token_f1(predicted: str | None, gold: str | None) -> float:
    """SQuAD-style token F1 of an open answer against the gold (both :func:`normalize_open`-ed).

    Open-ended VQA answers ("left lower lobe" vs "lower lobe") earn partial credit by overlap of
    their token multisets; an unparseable prediction (``None``) scores 0, never a guess.
    """
    if predicted is None or gold is None:
        return 0.0
    pred, ref = normalize_open(predicted).split(), normalize_open(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common: dict[str, int] = {}
    counts: dict[str, int] = {}
    for t in ref:
        counts[t] = counts.get(t, 0) + 1
    for t in pred:
        if counts.get(t, 0) > 0:
            counts[t] -= 1
            common[t] = common.get(t, 0) + 1
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)
