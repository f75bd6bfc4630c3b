"""Where a reply states its answer: the candidate statements, in order, for the reader to weigh.

:func:`find_candidates` lists every place a reply may state a final answer (explicit statements,
lead-ins and headings, a JSON block, the last line, implicit forms); :func:`contradicted` tells two
answers stated side by side from a revision.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from octomed_data.answers.forms import (
    ANSWER_TAG,
    BOXED,
    BRACKETED_LABEL,
    BRACKETED_LEAD,
    BULLET,
    CLOSING_LABEL,
    CLOSING_VERB,
    CONCLUSION,
    CONDITIONAL,
    HEADING,
    JSON_ANSWER,
    LABEL_FIRST,
    LABEL_LINE,
    NEGATED,
    NEGATION_WORD,
    PARAGRAPH_BREAK,
    REVISION,
    STATEMENT,
    STRONG_KW,
)
from octomed_data.answers.stated import clean, norm_option
from octomed_data.schema import TaskType


@dataclass(frozen=True)
class Candidate:
    pos: int
    method: str
    raw: str
    strong: bool  # boxed / <answer> / "final|correct answer": an unparseable one is not skipped
    # Read with the strict line reader (a label, a label and its option's text, an option's text):
    # the answer stands on a line of its own after a lead-in, or is the reply's last line.
    line: bool = False
    # Inside an earlier statement's line ("Final answer: ... the correct answer is: [I]"): when it
    # cannot be read, the enclosing statement is read instead.
    nested: bool = False
    ambiguous: bool = False  # a lead-in followed by several labelled lines ("A. ...\nC. ...")
    end: int = -1  # where a statement's rest ends (a later candidate before it is nested in it)


def line_at(text: str, pos: int) -> tuple[int, int]:
    """(start, end) of the line holding ``pos``."""
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return start, (len(text) if end < 0 else end)


def line_after(text: str, pos: int) -> tuple[int, str, bool] | None:
    """The answer line after a lead-in that ends at ``pos`` ("The correct answer is:", "### Answer").

    Returns (position, line, several): the first non-empty line (list markers stripped) and whether
    the lines of its paragraph list several labels ("A. ...\\nC. ...\\nD. ..."): a list of answers or
    an analysis of options, never one stated answer. ``None`` when nothing follows.
    """
    lines = text[pos:].split("\n")
    offset = pos
    first: tuple[int, str] | None = None
    labels: set[str] = set()
    for i, raw in enumerate(lines):
        line = raw.strip()
        if i == 0:  # the rest of the lead-in's own line
            offset += len(raw) + 1
            continue
        if first is None:
            if line:
                first = (offset, BULLET.sub("", line))
                m = LABEL_LINE.match(line)
                if m:
                    labels.add(m.group("label").upper())
        elif not line:
            break
        else:
            m = LABEL_LINE.match(line)
            if m:
                labels.add(m.group("label").upper())
        offset += len(raw) + 1
    if first is None:
        return None
    return first[0], first[1], len(labels) > 1


def last_line(text: str) -> tuple[int, str] | None:
    """The reply's last non-empty line, unless it ends a list of labelled lines."""
    stripped = text.rstrip()
    if not stripped:
        return None
    start = stripped.rfind("\n") + 1
    line = stripped[start:].strip()
    prev = [ln.strip() for ln in stripped[:start].splitlines() if ln.strip()]
    m = LABEL_LINE.match(line)
    if m and prev:
        p = LABEL_LINE.match(prev[-1])
        if p and p.group("label").upper() != m.group("label").upper():
            return None  # "C. Macrophages" as the last item of a restated option list
    if BULLET.match(line) and prev and BULLET.match(prev[-1]):
        return None  # the last item of a bulleted analysis ("* Treponema pallidum: Typically")
    return start, BULLET.sub("", line)


def contradicted(text: str, candidates: list[Candidate], cand: Candidate, answer: str, parse) -> bool:
    """Does an earlier statement of the same paragraph name another answer, with no revision between?

    "The correct answer is (H). The assessment ... The answer is (E)." states two answers; "The
    answer is B. Wait, ... the answer is C." revises one (the last clear statement wins).
    """
    for other in candidates:
        if other.pos >= cand.pos or other.method in ("last_line", "label_first"):
            continue
        between = text[other.pos : cand.pos]
        if PARAGRAPH_BREAK.search(between) or REVISION.search(between):
            continue
        got = parse(other.raw)[0] if not other.line else None
        lead = BRACKETED_LEAD.match(clean(other.raw))
        if got is None and lead:  # "(H). <text of option E> ... The answer is (E)."
            got = lead.group(1)
        if got is not None and got != answer:
            return True
    return False


def sentence_start(text: str, pos: int) -> int:
    """Where the sentence holding ``pos`` starts (after the last ". ", "? ", "! " or line break)."""
    return max(text.rfind("\n", 0, pos), *(text.rfind(p, 0, pos) + 1 for p in (". ", "? ", "! "))) + 1


def closing_label_at(text: str, options: Sequence[tuple[str, str]]) -> tuple[int, str] | None:
    """(position, label) when the reply's last sentence closes on a bracketed label after a verb,
    with nothing or that option's own text between them ("... is (F).", "... is Heroin (F).");
    "... which is also included in (J)." names no answer."""
    end = CLOSING_LABEL.search(text)
    if end is None:
        return None
    label = end.group("label")
    start = max(text.rfind("\n", 0, end.start()), text.rfind(". ", 0, end.start())) + 1
    for verb in CLOSING_VERB.finditer(text, start, end.start() + 1):
        said = text[verb.end() : end.start()].strip()
        if not said or any(k == label and norm_option(said) == norm_option(v) for k, v in options):
            return verb.start(), label
    return None


def find_candidates(text: str, task: TaskType, options: Sequence[tuple[str, str]]) -> list[Candidate]:
    found: list[Candidate] = []
    for m in BOXED.finditer(text):
        found.append(Candidate(m.start(), "boxed", m.group("rest"), True))
    for m in ANSWER_TAG.finditer(text):
        found.append(Candidate(m.start(), "answer_tag", m.group("rest"), True))
    for m in JSON_ANSWER.finditer(text):
        found.append(Candidate(m.start(), "json", m.group("rest"), True))
    boxed_spans = [(m.start(), m.end()) for m in BOXED.finditer(text)]
    lead_lines: set[int] = set()
    pos = 0
    enclosing_end = -1  # end of the line of the statement that encloses later matches
    while True:
        m = STATEMENT.search(text, pos)
        if m is None:
            break
        pos = m.start("rest") if m.start("rest") > m.end("kw") else m.end()
        nested = m.start() < enclosing_end
        if not nested:
            enclosing_end = m.end("rest")
        rest = m.group("rest")
        if re.search(r"\b(?:would|could|might)\b", m.group(0)) and CONDITIONAL.search(
            text, sentence_start(text, m.start()), m.start()
        ):
            continue  # "If the question had asked ..., the answer would be (B)": hypothetical
        if STATEMENT.match(clean(rest)):
            # "Final Answer: The answer is (I)": the nested statement, found next, is the one to read.
            continue
        strong = bool(STRONG_KW.search(m.group("kw")))
        closes = closing_label_at(rest, options)
        if closes is not None:  # "The correct answer would be a combination of these, which is (B)."
            found.append(Candidate(m.start("rest") + closes[0], "statement", closes[1], False, nested=True))
        paren = (m.group("paren") or "").strip()
        if re.fullmatch(r"[A-Z]", paren):  # "the answer (G) is ...": the label is the answer
            found.append(Candidate(m.start(), "statement", paren, strong, nested=nested))
            continue
        # "Final answer: \\boxed{C}": the boxed candidate already covers it.
        if any(s >= m.start("rest") and s <= m.end("rest") for s, _ in boxed_spans) and "\\boxed" in rest:
            continue
        if "<answer>" in rest.lower():
            continue
        if not clean(rest):  # "The correct answer is:" with the answer on the next line
            follow = line_after(text, m.end("rest"))
            lead_lines.add(line_at(text, m.start())[0])
            if follow is None:  # "Final answer:" with nothing after it states nothing
                continue
            at, line, several = follow
            found.append(Candidate(m.start(), "statement", line, strong, line=True, ambiguous=several))
            continue
        found.append(Candidate(m.start(), "statement", rest, strong, nested=nested, end=m.end("rest")))
    for m in HEADING.finditer(text):
        if m.start() in lead_lines:
            continue
        follow = line_after(text, m.end())
        if follow is not None:
            at, line, several = follow
            found.append(Candidate(m.start(), "heading", line, True, line=True, ambiguous=several))
    firsts = [
        m for m in LABEL_FIRST.finditer(text) if not NEGATED.search(text, max(0, m.start() - 12), m.start())
    ]
    several = len({m.group("label") for m in firsts}) > 1
    for m in firsts:
        raw = m.group("label") + (f". {m.group('text')}" if m.group("text") else "")
        found.append(Candidate(m.start(), "label_first", raw, False, nested=True, ambiguous=several))
    conclusions: list[tuple[int, str]] = []
    for m in CONCLUSION.finditer(text):
        said = m.group("body") or m.group("subject")
        if NEGATION_WORD.search(said):
            continue  # "the best next step would not be (A)"
        named = {x.group(1) or x.group(2) for x in BRACKETED_LABEL.finditer(said)} & {k for k, _ in options}
        if len(named) == 1:  # "Therefore, the best next step would be (C) Brain MRI." with one label
            conclusions.append((m.start(), named.pop()))
    several = len({label for _, label in conclusions}) > 1
    for pos, label in conclusions:
        found.append(Candidate(pos, "conclusion", label, False, nested=True, ambiguous=several))
    closing = closing_label_at(text.rstrip(), options)
    if closing is not None and not any(c.pos >= closing[0] for c in found):
        found.append(Candidate(closing[0], "closing_label", closing[1], False, nested=True))
    last = last_line(text)
    if last is not None and not any(c.pos >= last[0] for c in found):
        found.append(Candidate(last[0], "last_line", last[1], False, line=True))
    found.sort(key=lambda c: c.pos)
    return found
