"""Reading a stated answer: a label, a label and its option's text, an option's text, yes/no/maybe.

Each reader returns ``(answer, None)`` or ``(None, reason)``: an answer is never guessed, anything
unreadable or ambiguous is rejected with a reason (:data:`~.forms.NO_ANSWER`, :data:`~.forms.AMBIGUOUS`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from octomed_data.answers.forms import (
    AMBIGUOUS,
    ARTICLES,
    BOXED,
    COMMA_CONNECTOR,
    CONNECTOR,
    ELLIPSIS,
    LABEL_COMMA,
    LABEL_LEAD,
    LABEL_ONLY,
    LATEX_TEXT,
    LEAD_ARTICLE,
    LONE_CAPITAL,
    MATH_DELIMS,
    MULTI_LABEL,
    NO_ANSWER,
    OPTION_WORD,
    OR_OTHER,
    OTHER_LABEL,
    PUNCT,
    QUALIFIER,
    QUOTES,
    SECOND_ITEM,
    TEXT_TAIL,
    YNM,
)
from octomed_data.schema import TaskType


def normalize_open(text: str) -> str:
    """Normalise an open-ended answer: NFKC, lower case, no punctuation or articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().translate(PUNCT)
    return " ".join(ARTICLES.sub(" ", text).split())


def clean(raw: str) -> str:
    """Strip markup around a stated answer (bold, LaTeX wrappers, quotes, trailing period)."""
    text = raw.strip()
    for _ in range(3):  # \boxed{\text{C}} nests
        m = BOXED.search(text)
        if m:
            text = text[: m.start()] + m.group("rest") + text[m.end() :]
        text = LATEX_TEXT.sub(r"\1", text)
    text = text.replace("**", "").replace("__", "").replace("$", "").replace("`", "")
    text = MATH_DELIMS.sub(" ", text)  # "\\( \\text{G} \\)", "\\[ C \\]"
    text = text.strip().strip("\"'“”‘’").strip()
    text = ELLIPSIS.sub("", text)  # "The answer is ... H" (a template's placeholder left in)
    text = OPTION_WORD.sub("", text)
    return text.rstrip(" .;,!").strip()


def norm_option(text: str) -> str:
    """:func:`normalize_open`, but a lone capital ("(A)", ", A", "Hepatitis A") is a label, not an article.

    Only a leading "A " before a lower-case word is read as the article ("A fracture of the ulna").
    """

    def keep(m: re.Match) -> str:
        if m.start() == 0 and re.match(r"A\s+[a-z]", text):
            return m.group(0)
        return f" label{m.group(1).lower()} "

    return normalize_open(LONE_CAPITAL.sub(keep, text.strip()))


def light_norm(text: str) -> str:
    """NFKC, lower case, single spaces: punctuation kept so that what follows a match can be read."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def label_from_text(text: str, options: Sequence[tuple[str, str]]) -> str | None:
    label = text_match(text, options)
    return None if label == AMBIGUOUS else label


def text_match(text: str, options: Sequence[tuple[str, str]]) -> str | None:
    """The label whose option text the answer equals, or starts with followed by an explanation.

    "Insulin resistance", "Aspirin-induced asthma", "Metformin or insulin" name no option: the
    option text must be followed by nothing, punctuation or a connector ("because ..."), and an
    explanation that names another option ("metformin (C)", "metformin, not insulin") makes the
    answer :data:`AMBIGUOUS` (returned in place of a label). The longest matching option wins
    ("Metformin and insulin").
    """
    norm = norm_option(text)
    if not norm:
        return None
    cleaned = " ".join(unicodedata.normalize("NFKC", clean(text)).split())
    light = cleaned.lower()
    best: tuple[int, str] | None = None
    conflict = False
    for label, opt in options:
        o = norm_option(opt)
        if not o:
            continue
        ok = norm == o
        lo = light_norm(opt).rstrip(" .")
        if not ok and lo and light.startswith(lo):
            tail = cleaned[len(lo) :] if len(cleaned) == len(light) else light[len(lo) :].upper()
            ok = bool(TEXT_TAIL.match(tail))
            if ok and names_other(tail, label, options):
                ok, conflict = False, True
        if ok:
            if best is None or len(o) > best[0]:
                best = (len(o), label)
            elif len(o) == best[0] and best[1] != label:
                return None  # two options with the same text: cannot tell
    if best is None and conflict:
        return AMBIGUOUS
    return best[1] if best else None


def names_other(tail: str, label: str, options: Sequence[tuple[str, str]]) -> bool:
    """Does an explanation after an option's text name a different option (by "(X)", ", X" or text)?"""
    for m in OTHER_LABEL.finditer(tail):
        other = m.group("a") or m.group("b")
        if other != label and any(other == k for k, _ in options):
            return True
    words = f" {normalize_open(tail)} "
    for other, opt in options:
        o = normalize_open(opt)
        if other != label and o and f" {o} " in words:
            return True
    return False


def parse_choice(raw: str, options: Sequence[tuple[str, str]]) -> tuple[str | None, str | None]:
    """Read a stated multiple-choice answer as (label, None) or (None, reason)."""
    text = clean(raw)
    labels = {label for label, _ in options}
    if not text:
        return None, NO_ANSWER
    qualified = QUALIFIER.sub("", text, count=1)
    if qualified != text:  # "most likely C", "probably Ulna"
        text = clean(qualified)
    m = LABEL_ONLY.match(text)
    if m:
        label = m.group("label")
        return (label, None) if label in labels else (None, NO_ANSWER)
    pair = label_and_text(text, labels, options)
    if pair is not None:
        return pair
    if MULTI_LABEL.match(text):
        return None, AMBIGUOUS
    by_text = text_match(text, options)
    if by_text == AMBIGUOUS:  # "riboflavin (B)" where riboflavin is option C
        return None, AMBIGUOUS
    m = LABEL_LEAD.match(text)
    if m and m.group("label") in labels:
        label, sep, tail = m.group("label"), m.group("sep"), m.group("tail").strip()
        tail_label = label_from_text(tail, options) if tail else None
        if tail_label is not None and tail_label != label:
            # "C. <text of option D>": the label and the text disagree.
            return None, AMBIGUOUS
        # A bare space after a capital could be an article ("A fracture of ..."): accept it
        # only when what follows is the option's text or clearly an explanation.
        if any(m.group(1) != label and m.group(1) in labels for m in OR_OTHER.finditer(tail)):
            return None, AMBIGUOUS
        # "(D). Removing the tape ... (A/B) or (E) ...": a bracketed label and a full stop end the
        # statement; the next sentence is an explanation, not a second answer.
        closed_sentence = text[:1] in "([" and "." in sep
        if not closed_sentence and any(
            (x.group("p") or x.group("d")) != label and (x.group("p") or x.group("d")) in labels
            for x in SECOND_ITEM.finditer(tail)
        ):
            return None, AMBIGUOUS  # "A. Strengthener and B. Hardener", "(D) if ..., and (I) if ..."
        if sep.strip() or tail_label == label or not tail or CONNECTOR.match(tail):
            if not sep.strip() and tail and names_other(tail, label, options):
                return None, AMBIGUOUS  # "A is correct for X, but C is correct for Y"
            if by_text is not None and by_text != label and tail_label is None:
                return None, AMBIGUOUS
            return label, None
    m = COMMA_CONNECTOR.match(text)
    if m and m.group("label") in labels:
        label, tail = m.group("label"), text[m.end() :]
        if names_other(tail, label, options) or OR_OTHER.search(tail):
            return None, AMBIGUOUS
        return label, None
    if by_text is not None:
        return by_text, None
    return None, NO_ANSWER


def label_and_text(
    text: str, labels: set[str], options: Sequence[tuple[str, str]]
) -> tuple[str | None, str | None] | None:
    """Read "D, Ulna" / "D - Ulna" / "D, or Ulna" / 'C, "maybe."': a label, then that option's text.

    ``None`` when the text is not of this form (what follows the label names no option); an
    :data:`AMBIGUOUS` rejection when it names a different option than the label ("D, <text of A>").
    """
    m = LABEL_COMMA.match(text)
    if not m or m.group("label") not in labels:
        return None
    label = m.group("label")
    tail = m.group("tail").strip().strip(QUOTES).strip()
    tail = LEAD_ARTICLE.sub("", tail).strip(QUOTES).strip()
    if not tail:
        return None
    named = text_match(tail, options)
    if named is None:
        return None
    if named != label:
        return None, AMBIGUOUS
    return label, None


def parse_ynm(raw: str, options: Sequence[tuple[str, str]]) -> tuple[str | None, str | None]:
    text = clean(raw)
    # "yes or no", "no/maybe": more than one verdict in the statement.
    if re.match(r"^(?:yes|no|maybe)\s*(?:/|or\b|and\b|,)?\s*(?:yes|no|maybe)\b", text, re.IGNORECASE):
        return None, AMBIGUOUS
    if options:
        label, reason = parse_choice(text, options)
        if label is not None:
            word = dict(options)[label].strip().lower()
            if word in ("yes", "no", "maybe"):
                return word, None
        elif reason == AMBIGUOUS:  # "A, no", "yes (B)": the label and the verdict disagree
            return None, AMBIGUOUS
    m = YNM.match(text)
    if not m:
        return None, NO_ANSWER
    return m.group("w").lower(), None


def parse_open(raw: str, options: Sequence[tuple[str, str]]) -> tuple[str | None, str | None]:
    text = clean(raw)
    norm = normalize_open(text)
    return (norm, None) if norm else (None, NO_ANSWER)


def parse_line(
    raw: str, task: TaskType, options: Sequence[tuple[str, str]], parse, whole: bool = False
) -> tuple[str | None, str | None]:
    """Read a line that should hold only an answer: a label (also lower case), a label and that
    option's text, or an option's text; for other task types, the task's own reading.

    ``whole``: an option's text without its label must be the whole line (a reply's last line:
    "Treponema pallidum (Syphilis): Typically" is an analysis cut off, not an answer)."""
    text = clean(raw)
    if not text:
        return None, NO_ANSWER
    if not task.is_multiple_choice:
        if task == TaskType.YES_NO_MAYBE:
            return parse(text)
        return parse(text) if len(text.split()) <= 8 else (None, NO_ANSWER)
    labels = {label for label, _ in options}
    m = LABEL_ONLY.match(text.upper()) if len(text) <= 4 else None
    if m:
        label = m.group("label")
        return (label, None) if label in labels else (None, NO_ANSWER)
    m = LABEL_LEAD.match(text)
    if m is None and re.match(r"^[\(\[]?[a-z][\)\].:]", text):
        m = LABEL_LEAD.match(
            text[0].upper() + text[1:]
            if text[0] != "(" and text[0] != "["
            else text[0] + text[1].upper() + text[2:]
        )
    if m and m.group("label") in labels:
        label, tail = m.group("label"), m.group("tail").strip()
        named = text_match(tail, options) if tail else None
        if named == label:
            return label, None
        if named is not None:  # "C. <text of option D>"
            return None, AMBIGUOUS
        if not tail:
            return label, None
        return None, NO_ANSWER
    named = text_match(text, options)
    if named == AMBIGUOUS:
        return None, AMBIGUOUS
    if named and whole and norm_option(text) != norm_option(dict(options)[named]):
        return None, NO_ANSWER
    return (named, None) if named else (None, NO_ANSWER)
