"""THE answer-extraction module: rejection filtering and the evaluation harness both use it.

A teacher's final answer is found from its *explicit final-answer statements* (``\\boxed{C}``,
``<answer>C</answer>``, "Final answer: C", "The answer is (C)", "Answer: C", bold
``**Answer: C**``) and, when there are none, from a bare answer (the whole response is "C",
"(C)", "C. <option text>", "Yes.") or a bold label in the last paragraph. The last statement
wins, and only the last: when it cannot be read the reply is unparsed, never handed to an earlier
(perhaps hypothetical) statement; only a statement that describes the answer ("the answer is
clear: ...", "this answer is consistent with ...") is skipped as prose. A statement is read as a
label, a label with a trailing explanation, a label followed by a comma / dash(es) / "or" and
that option's text ("D, Ulna", 'C, "maybe."'), "most likely C", or an option's text instead of its
label. Anything unparseable or ambiguous ("C or D", a label and an option text that name
different options in either order) is rejected with a reason, never guessed.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from octomed_data.schema import TaskType

NO_ANSWER = "no_answer"
AMBIGUOUS = "ambiguous"
# The reply ends inside a thought (an opened <think> never closed): whatever it says is reasoning
# in progress, not a final answer, so nothing is read from it.
UNFINISHED_THOUGHT = "unfinished_thought"

# "<keyword> <verb/colon> <rest of line>". The verb is required so that prose such as
# "to answer this question" is not taken for a statement.
_STATEMENT = re.compile(
    r"(?P<kw>final\s+answer|correct\s+(?:answer|option|choice|response)|best\s+(?:answer|option|choice)"
    r"|right\s+answer|the\s+answer|answer)"
    # "Answer (letter): C", or the label itself: "the answer (G) is ..."
    r"(?:[ \t]*\((?P<paren>[^)\n]{0,20})\))?"
    # The verb is on the keyword's line: "### Answer\n- **Option A**: ..." is a heading, not "Answer - A".
    r"[ \t*_]*(?:is|would\s+be|should\s+be|will\s+be|must\s+be|=|:|-|–|—)(?![a-z])[ \t*_:]*(?P<rest>[^\n]*)",
    re.IGNORECASE,
)
# An answer heading on its own line ("### Answer", "**Final Answer**", "Answer:"): the answer is
# on the lines that follow.
_HEADING = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*"
    r"(?:(?:final|updated|revised|correct|best|my)[ \t]+)?answer(?:[ \t]+(?:choice|option))?"
    r"[ \t]*(?::[ \t]*)?(?:\*\*|__)?[ \t]*:?[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
# {"answer": "A"} (JSON answer blocks, also single-quoted).
_JSON_ANSWER = re.compile(
    r"""(?:(?<=\\n)|(?<![A-Za-z_]))["']?(?:final[_ ]?)?answer(?:[_ ]?(?:choice|option|letter|label))?["']\s*:\s*["'](?P<rest>[^"'\n]{1,200})["']""",
    re.IGNORECASE,
)
# A label stated first: "C is the correct answer", "Option C is correct", "(C) Macrophages is the
# most likely answer". Read only when every such sentence in the reply names the same label.
_LABEL_FIRST = re.compile(
    r"(?:^|(?<=[\s(\[*]))(?:\*\*)?(?:(?:option|choice)\s+)?[\(\[]?(?P<label>[A-Z])[\)\]]?(?:\*\*)?"
    r"(?:[.:)]?[ \t]+(?P<text>(?:(?![.!?]\s)[^\n]){1,120}?))?(?:\*\*)?"
    r"[ \t]+(?:is|would\s+be|remains)[ \t]+(?:therefore[ \t]+|thus[ \t]+|clearly[ \t]+)?(?:the[ \t]+)?"
    r"(?:most[ \t]+)?(?:correct|right|best|appropriate|accurate)"
    r"(?:[ \t]+(?:answer|option|choice|response|one))?(?=[ \t]*(?:[.,;:!)]|\*\*|$))",
    re.MULTILINE,
)
# A reply whose last sentence closes on a bracketed label: "Therefore, the most likely diagnosis is
# (F).", "... which corresponds to option (C)."
_CLOSING_LABEL = re.compile(
    r"(?:option[ \t]+|choice[ \t]+|answer[ \t]+)?(?:\*\*)?[\(\[](?P<label>[A-Z])[\)\]](?:\*\*)?[ \t]*[.!]?[ \t]*$"
)
# The verb before a closing label, with nothing or that option's text between them.
_CLOSING_VERB = re.compile(r"\b(?:is|are|be|was|as|to|matches|which\s+is|i\.e\.,?|namely)[ \t]+")
# A list item marker before an answer line: "- C. Macrophages", "* (C) MRI brain", "> C".
_BULLET = re.compile(r"^(?:[-*•>]\s+)+")
# A line that begins with an option label: "A. ...", "(B) ...", "**C)** ...", "- **Option D**: ...".
_LABEL_LINE = re.compile(
    r"^(?:[-*•>]\s+)?(?:\*\*|__)?\s*(?:option\s+|choice\s+)?[\(\[]?(?P<label>[A-Z])[\)\]]?(?:\*\*|__)?(?:[.:)\]]|\s*$|\s+[-–—]|\*\*)",
    re.IGNORECASE,
)
_STRONG_KW = re.compile(r"final|correct|best|right", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\s*\{(?P<rest>(?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_TAG = re.compile(r"<answer>(?P<rest>.*?)</answer>", re.IGNORECASE | re.DOTALL)
_BOLD = re.compile(r"\*\*(?P<rest>[^*\n]{1,200})\*\*")
_BOLD_LINE = re.compile(r"^\*\*(?P<rest>[^*\n]{1,200})\*\*[\s.]*$")
# A line that opens with a bold answer and goes on to explain it: "**A**, as ...", "**C** - because".
_BOLD_LEAD = re.compile(
    r"^\*\*(?P<rest>[^*\n]{1,200})\*\*(?=\s*(?:[,:;]|[-–—]\s|\s(?:as|because|since|is|was|which)\b))",
    re.IGNORECASE,
)
_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_LABEL_ONLY = re.compile(r"^[\(\[]?(?P<label>[A-Z])[\)\]]?[.:]?$")
_LABEL_LEAD = re.compile(r"^[\(\[]?(?P<label>[A-Z])(?P<sep>[\)\]][.:]?|[.:]|\s*[-–—]|(?=\s))\s*(?P<tail>.*)$")
_MULTI_LABEL = re.compile(
    r"^[\(\[]?[A-Z][\)\]]?[.:]?\s*(?:,|/|&|\band\b|\bor\b|\bthen\b)\s*(?:option\s+)?[\(\[]?[A-Z][\)\]]?(?:[\s.,;:]|$)",
    re.IGNORECASE,
)
# A second labelled item after a label-led answer: "... and B. Hardener", ", B. HSV II", "and (I) if".
_SECOND_ITEM = re.compile(
    r"(?:\band\b|\bor\b|&|,|;|/)\s*(?:option\s+|choice\s+)?(?:[\(\[](?P<p>[A-Z])[\)\]]|(?P<d>[A-Z])[.)]\s)"
)
_BRACKETED_LEAD = re.compile(r"^[\(\[]([A-Z])[\)\]]")
_IMPLICIT = ("last_line", "label_first", "closing_label", "conclusion")  # forms that state no keyword
# A clause that makes the statement after it hypothetical.
_CONDITIONAL = re.compile(r"\b(?:if|had|were|unless|assuming|suppose|supposing|otherwise)\b", re.IGNORECASE)
# A concluding sentence that names the best option by a bracketed label: "Therefore, the best course
# of action would be (C) Obtain more clinical information.", "... an MRI Brain (Option B)."
_CONCLUSION = re.compile(
    r"(?:^|(?<=[.!?]\s)|(?<=\n))[ \t]*(?:(?:therefore|thus|hence|so|in\s+conclusion|in\s+summary|overall)[ \t,]+"
    r"(?P<body>(?:(?![.!?]\s)[^\n])*?\b(?:best|most\s+(?:appropriate|likely|accurate|suitable|probable)|next\s+best|correct)\b"
    r"[^\n]*?)"
    # or a sentence whose subject is the superlative: "..., the most appropriate next step in management
    # would be immediate surgical exploration (D)."
    r"|(?P<subject>(?:(?![.!?]\s)[^\n])*?\bthe\s+(?:best|most\s+(?:appropriate|likely|accurate|suitable|probable)|next\s+best)"
    r"(?:\s+[\w-]+){0,6}?\s+(?:is|would\s+be)\b[^\n]*?))(?=[.!?](?:\s|$)|\n|$)",
    re.IGNORECASE,
)
_NEGATION_WORD = re.compile(r"\b(?:not|never|no longer|rather than|instead of)\b|n't\b", re.IGNORECASE)
_BRACKETED_LABEL = re.compile(r"[\(\[](?:[Oo]ption\s+|[Cc]hoice\s+)?([A-Z])[\)\]]|\*\*\(?([A-Z])[.)]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# Words that revise an earlier answer ("wait", "on reflection"): the later statement then wins.
_REVISION = re.compile(
    r"\b(?:wait|actually|however|but|hmm+|on\s+(?:second\s+thought|reflection)|re-?evaluat\w*|reconsider\w*"
    r"|correction|mistake|revis\w*|instead|rather|no,)",
    re.IGNORECASE,
)
_NEGATED = re.compile(r"\b(?:not|if|why|whether|unless)\s+$", re.IGNORECASE)
_MATH_DELIMS = re.compile(r"\\[()\[\]]")
_ELLIPSIS = re.compile(r"^(?:\.{2,}|…)\s*")
_OPTION_WORD = re.compile(r"^(?:option|choice|letter)\s+", re.IGNORECASE)
_CONNECTOR = re.compile(r"^(?:[-–—,;(]|because\b|since\b|as\b|which\b|given\b|due\b|is\b)", re.IGNORECASE)
# The verdict must end the statement or be followed by punctuation or an explanation:
# "no longer clear", "No evidence was found", "yes-ish" are prose, not verdicts.
_YNM = re.compile(
    r"^(?P<w>yes|no|maybe)(?:\s*$|\s*[.,;:!(]|\s+[-–—]\s|\s+(?:because|since|as|given|due|based)\b)",
    re.IGNORECASE,
)
# A statement that negates or hedges ("the answer is not B", "... is unclear") retracts any
# earlier answer: it is never skipped as prose.
_HEDGE = re.compile(
    r"^(?:not\b|neither\b|none\b|either\b|unclear|uncertain|ambiguous|debatable|indeterminate"
    r"|cannot\b|can't\b|can not\b|impossible\b|unknown\b)",
    re.IGNORECASE,
)
# What may follow an option's text in a statement: nothing, punctuation, or an explanation.
_TEXT_TAIL = re.compile(
    r"^(?:[\s.!]*$|\s*[,;:(\[]|[.!]\s|\s+[-–—]\s|\s+(?:because|since|as|which|given|due)\b)",
    re.IGNORECASE,
)
# "B (or possibly C)": a hedge between labels in the explanation.
_OR_OTHER = re.compile(
    r"\b[Oo][Rr]\s+(?:possibly\s+|perhaps\s+|maybe\s+)?(?:option\s+)?\(?([A-Z])\)?(?![A-Za-z])"
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# "D, Ulna", "D - Ulna", "D -- Ulna", "D, or generalized anxiety disorder", "C, \"maybe.\"": a label,
# a comma / dash(es) / "or", then (it must be checked) that option's text.
_LABEL_COMMA = re.compile(
    r"^[\(\[]?(?P<label>[A-Z])[\)\]]?\s*(?:,|;|-{1,2}|–|—)?\s*(?:\bor\s+)?(?P<tail>\S.*)$", re.DOTALL
)
# "D, because ...", "D, which ...": a label, a comma and an explanation.
_COMMA_CONNECTOR = re.compile(
    r"^[\(\[]?(?P<label>[A-Z])[\)\]]?\s*,\s*(?:because|since|which|given|due\s+to)\b"
)
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
_LEAD_ARTICLE = re.compile(r"^(?:the|an|a)\s+", re.IGNORECASE)
_QUOTES = "\"'“”‘’«»"
# "most likely C", "probably Ulna": a qualifier before the stated answer.
_QUALIFIER = re.compile(
    r"^[\s,]*(?:most\s+likely|most\s+probably|likely|probably|definitely|clearly|therefore|thus)\s*[:,]?\s+",
    re.IGNORECASE,
)
# Another label named in an explanation: "(B)", "[option B]", ", B", "- option B", "B is", a lone " B.".
_OTHER_LABEL = re.compile(
    r"[\(\[]\s*(?:option\s+|choice\s+)?(?P<a>[A-Z])\s*[\)\]]"
    r"|(?:^|[\s,;:/])(?:option\s+|choice\s+)?(?P<b>[A-Z])(?=\s*(?:[).,;:\]!?]|$|\s+(?:is|was|would|could|might|may|or|and)\b))",
)
# A weak statement whose rest begins like this describes the answer rather than stating it
# ("The answer is clear: ...", "This answer is consistent with ..."): it is prose, and the search
# goes on. Any other unreadable statement ends the search.
_PROSE_REST = re.compile(
    r"^(?:clear|obvious|evident|apparent|straightforward|simple|tricky|complex|complicated|difficult"
    r"|challenging|subtle|nuanced|consistent|inconsistent|supported|based|found|determined|derived|related"
    r"|hidden|key|important|relevant|correct\s+because|in\s+line|within|as\s+follows|below|above"
    r"|further|more\s+|less\s+|a\s+matter|one\s+of\s+the\s+following|to\s+be\s+found|likely\s+to)",
    re.IGNORECASE,
)
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_REFUSAL = re.compile(
    r"\b(?:I\s*(?:'m|am)\s+(?:sorry|unable)|I\s+(?:can(?:'|no)t|cannot|won't|will\s+not)\s+"
    r"(?:help|assist|provide|answer|comply))",
    re.IGNORECASE,
)


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


@dataclass(frozen=True)
class _Candidate:
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


def normalize_open(text: str) -> str:
    """Normalise an open-ended answer: NFKC, lower case, no punctuation or articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _clean(raw: str) -> str:
    """Strip markup around a stated answer (bold, LaTeX wrappers, quotes, trailing period)."""
    text = raw.strip()
    for _ in range(3):  # \boxed{\text{C}} nests
        m = _BOXED.search(text)
        if m:
            text = text[: m.start()] + m.group("rest") + text[m.end() :]
        text = _LATEX_TEXT.sub(r"\1", text)
    text = text.replace("**", "").replace("__", "").replace("$", "").replace("`", "")
    text = _MATH_DELIMS.sub(" ", text)  # "\\( \\text{G} \\)", "\\[ C \\]"
    text = text.strip().strip("\"'“”‘’").strip()
    text = _ELLIPSIS.sub("", text)  # "The answer is ... H" (a template's placeholder left in)
    text = _OPTION_WORD.sub("", text)
    return text.rstrip(" .;,!").strip()


def _norm_option(text: str) -> str:
    """:func:`normalize_open`, but a lone capital ("(A)", ", A", "Hepatitis A") is a label, not an article.

    Only a leading "A " before a lower-case word is read as the article ("A fracture of the ulna").
    """

    def keep(m: re.Match) -> str:
        if m.start() == 0 and re.match(r"A\s+[a-z]", text):
            return m.group(0)
        return f" label{m.group(1).lower()} "

    return normalize_open(_LONE_CAPITAL.sub(keep, text.strip()))


def _light_norm(text: str) -> str:
    """NFKC, lower case, single spaces: punctuation kept so that what follows a match can be read."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _label_from_text(text: str, options: Sequence[tuple[str, str]]) -> str | None:
    label = _text_match(text, options)
    return None if label == AMBIGUOUS else label


def _text_match(text: str, options: Sequence[tuple[str, str]]) -> str | None:
    """The label whose option text the answer equals, or starts with followed by an explanation.

    "Insulin resistance", "Aspirin-induced asthma", "Metformin or insulin" name no option: the
    option text must be followed by nothing, punctuation or a connector ("because ..."), and an
    explanation that names another option ("metformin (C)", "metformin, not insulin") makes the
    answer :data:`AMBIGUOUS` (returned in place of a label). The longest matching option wins
    ("Metformin and insulin").
    """
    norm = _norm_option(text)
    if not norm:
        return None
    cleaned = " ".join(unicodedata.normalize("NFKC", _clean(text)).split())
    light = cleaned.lower()
    best: tuple[int, str] | None = None
    conflict = False
    for label, opt in options:
        o = _norm_option(opt)
        if not o:
            continue
        ok = norm == o
        lo = _light_norm(opt).rstrip(" .")
        if not ok and lo and light.startswith(lo):
            tail = cleaned[len(lo) :] if len(cleaned) == len(light) else light[len(lo) :].upper()
            ok = bool(_TEXT_TAIL.match(tail))
            if ok and _names_other(tail, label, options):
                ok, conflict = False, True
        if ok:
            if best is None or len(o) > best[0]:
                best = (len(o), label)
            elif len(o) == best[0] and best[1] != label:
                return None  # two options with the same text: cannot tell
    if best is None and conflict:
        return AMBIGUOUS
    return best[1] if best else None


def _names_other(tail: str, label: str, options: Sequence[tuple[str, str]]) -> bool:
    """Does an explanation after an option's text name a different option (by "(X)", ", X" or text)?"""
    for m in _OTHER_LABEL.finditer(tail):
        other = m.group("a") or m.group("b")
        if other != label and any(other == k for k, _ in options):
            return True
    words = f" {normalize_open(tail)} "
    for other, opt in options:
        o = normalize_open(opt)
        if other != label and o and f" {o} " in words:
            return True
    return False


def _parse_choice(raw: str, options: Sequence[tuple[str, str]]) -> tuple[str | None, str | None]:
    """Read a stated multiple-choice answer as (label, None) or (None, reason)."""
    text = _clean(raw)
    labels = {label for label, _ in options}
    if not text:
        return None, NO_ANSWER
    qualified = _QUALIFIER.sub("", text, count=1)
    if qualified != text:  # "most likely C", "probably Ulna"
        text = _clean(qualified)
    m = _LABEL_ONLY.match(text)
    if m:
        label = m.group("label")
        return (label, None) if label in labels else (None, NO_ANSWER)
    pair = _label_and_text(text, labels, options)
    if pair is not None:
        return pair
    if _MULTI_LABEL.match(text):
        return None, AMBIGUOUS
    by_text = _text_match(text, options)
    if by_text == AMBIGUOUS:  # "riboflavin (B)" where riboflavin is option C
        return None, AMBIGUOUS
    m = _LABEL_LEAD.match(text)
    if m and m.group("label") in labels:
        label, sep, tail = m.group("label"), m.group("sep"), m.group("tail").strip()
        tail_label = _label_from_text(tail, options) if tail else None
        if tail_label is not None and tail_label != label:
            # "C. <text of option D>": the label and the text disagree.
            return None, AMBIGUOUS
        # A bare space after a capital could be an article ("A fracture of ..."): accept it
        # only when what follows is the option's text or clearly an explanation.
        if any(m.group(1) != label and m.group(1) in labels for m in _OR_OTHER.finditer(tail)):
            return None, AMBIGUOUS
        # "(D). Removing the tape ... (A/B) or (E) ...": a bracketed label and a full stop end the
        # statement; the next sentence is an explanation, not a second answer.
        closed_sentence = text[:1] in "([" and "." in sep
        if not closed_sentence and any(
            (x.group("p") or x.group("d")) != label and (x.group("p") or x.group("d")) in labels
            for x in _SECOND_ITEM.finditer(tail)
        ):
            return None, AMBIGUOUS  # "A. Strengthener and B. Hardener", "(D) if ..., and (I) if ..."
        if sep.strip() or tail_label == label or not tail or _CONNECTOR.match(tail):
            if not sep.strip() and tail and _names_other(tail, label, options):
                return None, AMBIGUOUS  # "A is correct for X, but C is correct for Y"
            if by_text is not None and by_text != label and tail_label is None:
                return None, AMBIGUOUS
            return label, None
    m = _COMMA_CONNECTOR.match(text)
    if m and m.group("label") in labels:
        label, tail = m.group("label"), text[m.end() :]
        if _names_other(tail, label, options) or _OR_OTHER.search(tail):
            return None, AMBIGUOUS
        return label, None
    if by_text is not None:
        return by_text, None
    return None, NO_ANSWER


def _label_and_text(
    text: str, labels: set[str], options: Sequence[tuple[str, str]]
) -> tuple[str | None, str | None] | None:
    """Read "D, Ulna" / "D - Ulna" / "D, or Ulna" / 'C, "maybe."': a label, then that option's text.

    ``None`` when the text is not of this form (what follows the label names no option); an
    :data:`AMBIGUOUS` rejection when it names a different option than the label ("D, <text of A>").
    """
    m = _LABEL_COMMA.match(text)
    if not m or m.group("label") not in labels:
        return None
    label = m.group("label")
    tail = m.group("tail").strip().strip(_QUOTES).strip()
    tail = _LEAD_ARTICLE.sub("", tail).strip(_QUOTES).strip()
    if not tail:
        return None
    named = _text_match(tail, options)
    if named is None:
        return None
    if named != label:
        return None, AMBIGUOUS
    return label, None


def _parse_ynm(raw: str, options: Sequence[tuple[str, str]]) -> tuple[str | None, str | None]:
    text = _clean(raw)
    # "yes or no", "no/maybe": more than one verdict in the statement.
    if re.match(r"^(?:yes|no|maybe)\s*(?:/|or\b|and\b|,)?\s*(?:yes|no|maybe)\b", text, re.IGNORECASE):
        return None, AMBIGUOUS
    if options:
        label, reason = _parse_choice(text, options)
        if label is not None:
            word = dict(options)[label].strip().lower()
            if word in ("yes", "no", "maybe"):
                return word, None
        elif reason == AMBIGUOUS:  # "A, no", "yes (B)": the label and the verdict disagree
            return None, AMBIGUOUS
    m = _YNM.match(text)
    if not m:
        return None, NO_ANSWER
    return m.group("w").lower(), None


def _parse_open(raw: str, options: Sequence[tuple[str, str]]) -> tuple[str | None, str | None]:
    text = _clean(raw)
    norm = normalize_open(text)
    return (norm, None) if norm else (None, NO_ANSWER)


def _line_at(text: str, pos: int) -> tuple[int, int]:
    """(start, end) of the line holding ``pos``."""
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return start, (len(text) if end < 0 else end)


def _follow(text: str, pos: int) -> tuple[int, str, bool] | None:
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
                first = (offset, _BULLET.sub("", line))
                m = _LABEL_LINE.match(line)
                if m:
                    labels.add(m.group("label").upper())
        elif not line:
            break
        else:
            m = _LABEL_LINE.match(line)
            if m:
                labels.add(m.group("label").upper())
        offset += len(raw) + 1
    if first is None:
        return None
    return first[0], first[1], len(labels) > 1


def _last_line(text: str) -> tuple[int, str] | None:
    """The reply's last non-empty line, unless it ends a list of labelled lines."""
    stripped = text.rstrip()
    if not stripped:
        return None
    start = stripped.rfind("\n") + 1
    line = stripped[start:].strip()
    prev = [ln.strip() for ln in stripped[:start].splitlines() if ln.strip()]
    m = _LABEL_LINE.match(line)
    if m and prev:
        p = _LABEL_LINE.match(prev[-1])
        if p and p.group("label").upper() != m.group("label").upper():
            return None  # "C. Macrophages" as the last item of a restated option list
    if _BULLET.match(line) and prev and _BULLET.match(prev[-1]):
        return None  # the last item of a bulleted analysis ("* Treponema pallidum: Typically")
    return start, _BULLET.sub("", line)


def _parse_line(
    raw: str, task: TaskType, options: Sequence[tuple[str, str]], parse, whole: bool = False
) -> tuple[str | None, str | None]:
    """Read a line that should hold only an answer: a label (also lower case), a label and that
    option's text, or an option's text; for other task types, the task's own reading.

    ``whole``: an option's text without its label must be the whole line (a reply's last line:
    "Treponema pallidum (Syphilis): Typically" is an analysis cut off, not an answer)."""
    text = _clean(raw)
    if not text:
        return None, NO_ANSWER
    if not task.is_multiple_choice:
        if task == TaskType.YES_NO_MAYBE:
            return parse(text)
        return parse(text) if len(text.split()) <= 8 else (None, NO_ANSWER)
    labels = {label for label, _ in options}
    m = _LABEL_ONLY.match(text.upper()) if len(text) <= 4 else None
    if m:
        label = m.group("label")
        return (label, None) if label in labels else (None, NO_ANSWER)
    m = _LABEL_LEAD.match(text)
    if m is None and re.match(r"^[\(\[]?[a-z][\)\].:]", text):
        m = _LABEL_LEAD.match(
            text[0].upper() + text[1:]
            if text[0] != "(" and text[0] != "["
            else text[0] + text[1].upper() + text[2:]
        )
    if m and m.group("label") in labels:
        label, tail = m.group("label"), m.group("tail").strip()
        named = _text_match(tail, options) if tail else None
        if named == label:
            return label, None
        if named is not None:  # "C. <text of option D>"
            return None, AMBIGUOUS
        if not tail:
            return label, None
        return None, NO_ANSWER
    named = _text_match(text, options)
    if named == AMBIGUOUS:
        return None, AMBIGUOUS
    if named and whole and _norm_option(text) != _norm_option(dict(options)[named]):
        return None, NO_ANSWER
    return (named, None) if named else (None, NO_ANSWER)


def _contradicted(text: str, candidates: list[_Candidate], cand: _Candidate, answer: str, parse) -> bool:
    """Does an earlier statement of the same paragraph name another answer, with no revision between?

    "The correct answer is (H). The assessment ... The answer is (E)." states two answers; "The
    answer is B. Wait, ... the answer is C." revises one (the last clear statement wins).
    """
    for other in candidates:
        if other.pos >= cand.pos or other.method in ("last_line", "label_first"):
            continue
        between = text[other.pos : cand.pos]
        if _PARAGRAPH_BREAK.search(between) or _REVISION.search(between):
            continue
        got = parse(other.raw)[0] if not other.line else None
        lead = _BRACKETED_LEAD.match(_clean(other.raw))
        if got is None and lead:  # "(H). <text of option E> ... The answer is (E)."
            got = lead.group(1)
        if got is not None and got != answer:
            return True
    return False


def _sentence_start(text: str, pos: int) -> int:
    """Where the sentence holding ``pos`` starts (after the last ". ", "? ", "! " or line break)."""
    return max(text.rfind("\n", 0, pos), *(text.rfind(p, 0, pos) + 1 for p in (". ", "? ", "! "))) + 1


def _closing_label(text: str, options: Sequence[tuple[str, str]]) -> tuple[int, str] | None:
    """(position, label) when the reply's last sentence closes on a bracketed label after a verb,
    with nothing or that option's own text between them ("... is (F).", "... is Heroin (F).");
    "... which is also included in (J)." names no answer."""
    end = _CLOSING_LABEL.search(text)
    if end is None:
        return None
    label = end.group("label")
    start = max(text.rfind("\n", 0, end.start()), text.rfind(". ", 0, end.start())) + 1
    for verb in _CLOSING_VERB.finditer(text, start, end.start() + 1):
        said = text[verb.end() : end.start()].strip()
        if not said or any(k == label and _norm_option(said) == _norm_option(v) for k, v in options):
            return verb.start(), label
    return None


def _candidates(text: str, task: TaskType, options: Sequence[tuple[str, str]]) -> list[_Candidate]:
    found: list[_Candidate] = []
    for m in _BOXED.finditer(text):
        found.append(_Candidate(m.start(), "boxed", m.group("rest"), True))
    for m in _ANSWER_TAG.finditer(text):
        found.append(_Candidate(m.start(), "answer_tag", m.group("rest"), True))
    for m in _JSON_ANSWER.finditer(text):
        found.append(_Candidate(m.start(), "json", m.group("rest"), True))
    boxed_spans = [(m.start(), m.end()) for m in _BOXED.finditer(text)]
    lead_lines: set[int] = set()
    pos = 0
    enclosing_end = -1  # end of the line of the statement that encloses later matches
    while True:
        m = _STATEMENT.search(text, pos)
        if m is None:
            break
        pos = m.start("rest") if m.start("rest") > m.end("kw") else m.end()
        nested = m.start() < enclosing_end
        if not nested:
            enclosing_end = m.end("rest")
        rest = m.group("rest")
        if re.search(r"\b(?:would|could|might)\b", m.group(0)) and _CONDITIONAL.search(
            text, _sentence_start(text, m.start()), m.start()
        ):
            continue  # "If the question had asked ..., the answer would be (B)": hypothetical
        if _STATEMENT.match(_clean(rest)):
            # "Final Answer: The answer is (I)": the nested statement, found next, is the one to read.
            continue
        strong = bool(_STRONG_KW.search(m.group("kw")))
        closes = _closing_label(rest, options)
        if closes is not None:  # "The correct answer would be a combination of these, which is (B)."
            found.append(_Candidate(m.start("rest") + closes[0], "statement", closes[1], False, nested=True))
        paren = (m.group("paren") or "").strip()
        if re.fullmatch(r"[A-Z]", paren):  # "the answer (G) is ...": the label is the answer
            found.append(_Candidate(m.start(), "statement", paren, strong, nested=nested))
            continue
        # "Final answer: \\boxed{C}": the boxed candidate already covers it.
        if any(s >= m.start("rest") and s <= m.end("rest") for s, _ in boxed_spans) and "\\boxed" in rest:
            continue
        if "<answer>" in rest.lower():
            continue
        if not _clean(rest):  # "The correct answer is:" with the answer on the next line
            follow = _follow(text, m.end("rest"))
            lead_lines.add(_line_at(text, m.start())[0])
            if follow is None:  # "Final answer:" with nothing after it states nothing
                continue
            at, line, several = follow
            found.append(_Candidate(m.start(), "statement", line, strong, line=True, ambiguous=several))
            continue
        found.append(_Candidate(m.start(), "statement", rest, strong, nested=nested, end=m.end("rest")))
    for m in _HEADING.finditer(text):
        if m.start() in lead_lines:
            continue
        follow = _follow(text, m.end())
        if follow is not None:
            at, line, several = follow
            found.append(_Candidate(m.start(), "heading", line, True, line=True, ambiguous=several))
    firsts = [
        m for m in _LABEL_FIRST.finditer(text) if not _NEGATED.search(text, max(0, m.start() - 12), m.start())
    ]
    several = len({m.group("label") for m in firsts}) > 1
    for m in firsts:
        raw = m.group("label") + (f". {m.group('text')}" if m.group("text") else "")
        found.append(_Candidate(m.start(), "label_first", raw, False, nested=True, ambiguous=several))
    conclusions: list[tuple[int, str]] = []
    for m in _CONCLUSION.finditer(text):
        said = m.group("body") or m.group("subject")
        if _NEGATION_WORD.search(said):
            continue  # "the best next step would not be (A)"
        named = {x.group(1) or x.group(2) for x in _BRACKETED_LABEL.finditer(said)} & {k for k, _ in options}
        if len(named) == 1:  # "Therefore, the best next step would be (C) Brain MRI." with one label
            conclusions.append((m.start(), named.pop()))
    several = len({label for _, label in conclusions}) > 1
    for pos, label in conclusions:
        found.append(_Candidate(pos, "conclusion", label, False, nested=True, ambiguous=several))
    closing = _closing_label(text.rstrip(), options)
    if closing is not None and not any(c.pos >= closing[0] for c in found):
        found.append(_Candidate(closing[0], "closing_label", closing[1], False, nested=True))
    last = _last_line(text)
    if last is not None and not any(c.pos >= last[0] for c in found):
        found.append(_Candidate(last[0], "last_line", last[1], False, line=True))
    found.sort(key=lambda c: c.pos)
    return found


def _later_bold_disagrees(text: str, cand: _Candidate, answer: str, parse) -> bool:
    """Does a later line that is only a bold answer ("**C**") name something else?

    Bold inside prose ("1. **Option A** is wrong") is an explanation, not an answer.
    """
    line_end = text.find("\n", cand.pos)
    if line_end < 0:
        return False
    for line in text[line_end:].splitlines():
        m = _BOLD_LINE.match(line.strip())
        if m:
            other = parse(m.group("rest"))[0]
            if other is not None and other != answer:
                return True
    return False


def _fallback_lines(text: str) -> list[str]:
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
    text = _THINK.sub(" ", response)
    if "</think>" in text.lower():
        text = text[text.lower().rindex("</think>") + len("</think>") :]
    if "<think>" in text.lower():
        # Cut off (or stopped) mid-thought: "the answer is B" there is a step, not a verdict.
        return Extraction(None, "none", UNFINISHED_THOUGHT)
    opts = [(str(k), str(v)) for k, v in options]
    if task.is_multiple_choice:

        def parse(raw: str) -> tuple[str | None, str | None]:
            return _parse_choice(raw, opts)
    elif task == TaskType.YES_NO_MAYBE:

        def parse(raw: str) -> tuple[str | None, str | None]:
            return _parse_ynm(raw, opts)
    else:

        def parse(raw: str) -> tuple[str | None, str | None]:
            return _parse_open(raw, opts)

    closed = task != TaskType.OPEN_QA and task != TaskType.OPEN_VQA
    candidates = _candidates(text, task, opts)
    explicit = any(c.method not in _IMPLICIT for c in candidates)
    for cand in reversed(candidates):
        if explicit and cand.method in ("label_first", "closing_label", "conclusion"):
            continue  # "(C) is correct", "... is (F).": read only where no explicit statement is made
        if cand.ambiguous:  # a lead-in followed by several labelled lines
            return Extraction(None, cand.method, AMBIGUOUS)
        last = cand.method == "last_line"
        # "None of the above" is a hedge unless it is an option's text.
        if _HEDGE.match(_clean(cand.raw)) and _label_from_text(cand.raw, opts) is None:
            if last:
                continue
            return Extraction(None, cand.method, AMBIGUOUS)
        answer, reason = (
            _parse_line(cand.raw, task, opts, parse, whole=last) if cand.line else parse(cand.raw)
        )
        if answer is not None:
            if closed and not last and _contradicted(text, candidates, cand, answer, parse):
                return Extraction(None, cand.method, AMBIGUOUS)
            if closed and _later_bold_disagrees(text, cand, answer, parse):
                # "the answer is B. But wait: **C** ...": a later bold answer retracts it.
                return Extraction(None, cand.method, AMBIGUOUS)
            return Extraction(answer, cand.method, text=_clean(cand.raw))
        if last or cand.nested:
            continue  # a last line that is no answer; a nested statement: read the enclosing one
        if reason == AMBIGUOUS or cand.strong:
            return Extraction(None, cand.method, reason)
        if not _PROSE_REST.match(_clean(cand.raw)):
            # The last explicit statement cannot be read: the reply is unparsed. An earlier
            # statement ("... the answer would be A if ...") is never its verdict.
            return Extraction(None, cand.method, reason)
        # A weak statement that describes the answer ("the answer is clear: ...") is prose.
    if explicit:
        return Extraction(None, "statement", NO_ANSWER)
    return _fallback(text, task, opts, parse)


def _fallback(text: str, task: TaskType, opts: Sequence[tuple[str, str]], parse) -> Extraction:
    lines = _fallback_lines(text)
    if not lines:
        return Extraction(None, "none", NO_ANSWER)
    closed = task != TaskType.OPEN_QA and task != TaskType.OPEN_VQA
    bold = [m.group("rest") for ln in lines for m in _BOLD.finditer(ln)]
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
            m = _BOLD_LINE.match(ln) or _BOLD_LEAD.match(ln)
            if m:
                answer, reason = _parse_line(m.group("rest"), task, opts, parse)
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
                return Extraction(answer, "bare", text=_clean(line))
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
    return bool(text) and bool(_REFUSAL.search(text or ""))


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
