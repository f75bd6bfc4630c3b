"""The forms final answers are stated in: the patterns THE answer reader looks for.

Each pattern says, in a line, what it matches and why; :mod:`.candidates` finds where a reply states
an answer with them, :mod:`.stated` reads what is stated.
"""

from __future__ import annotations

import re
import string

NO_ANSWER = "no_answer"
AMBIGUOUS = "ambiguous"
# The reply ends inside a thought (an opened <think> never closed): whatever it says is reasoning
# in progress, not a final answer, so nothing is read from it.
UNFINISHED_THOUGHT = "unfinished_thought"

# "<keyword> <verb/colon> <rest of line>". The verb is required so that prose such as
# "to answer this question" is not taken for a statement.
STATEMENT = re.compile(
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
HEADING = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*"
    r"(?:(?:final|updated|revised|correct|best|my)[ \t]+)?answer(?:[ \t]+(?:choice|option))?"
    r"[ \t]*(?::[ \t]*)?(?:\*\*|__)?[ \t]*:?[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
# {"answer": "A"} (JSON answer blocks, also single-quoted).
JSON_ANSWER = re.compile(
    r"""(?:(?<=\\n)|(?<![A-Za-z_]))["']?(?:final[_ ]?)?answer(?:[_ ]?(?:choice|option|letter|label))?["']\s*:\s*["'](?P<rest>[^"'\n]{1,200})["']""",
    re.IGNORECASE,
)
# A label stated first: "C is the correct answer", "Option C is correct", "(C) Macrophages is the
# most likely answer". Read only when every such sentence in the reply names the same label.
LABEL_FIRST = re.compile(
    r"(?:^|(?<=[\s(\[*]))(?:\*\*)?(?:(?:option|choice)\s+)?[\(\[]?(?P<label>[A-Z])[\)\]]?(?:\*\*)?"
    r"(?:[.:)]?[ \t]+(?P<text>(?:(?![.!?]\s)[^\n]){1,120}?))?(?:\*\*)?"
    r"[ \t]+(?:is|would\s+be|remains)[ \t]+(?:therefore[ \t]+|thus[ \t]+|clearly[ \t]+)?(?:the[ \t]+)?"
    r"(?:most[ \t]+)?(?:correct|right|best|appropriate|accurate)"
    r"(?:[ \t]+(?:answer|option|choice|response|one))?(?=[ \t]*(?:[.,;:!)]|\*\*|$))",
    re.MULTILINE,
)
# A reply whose last sentence closes on a bracketed label: "Therefore, the most likely diagnosis is
# (F).", "... which corresponds to option (C)."
CLOSING_LABEL = re.compile(
    r"(?:option[ \t]+|choice[ \t]+|answer[ \t]+)?(?:\*\*)?[\(\[](?P<label>[A-Z])[\)\]](?:\*\*)?[ \t]*[.!]?[ \t]*$"
)
# The verb before a closing label, with nothing or that option's text between them.
CLOSING_VERB = re.compile(r"\b(?:is|are|be|was|as|to|matches|which\s+is|i\.e\.,?|namely)[ \t]+")
# A list item marker before an answer line: "- C. Macrophages", "* (C) MRI brain", "> C".
BULLET = re.compile(r"^(?:[-*•>]\s+)+")
# A line that begins with an option label: "A. ...", "(B) ...", "**C)** ...", "- **Option D**: ...".
LABEL_LINE = re.compile(
    r"^(?:[-*•>]\s+)?(?:\*\*|__)?\s*(?:option\s+|choice\s+)?[\(\[]?(?P<label>[A-Z])[\)\]]?(?:\*\*|__)?(?:[.:)\]]|\s*$|\s+[-–—]|\*\*)",
    re.IGNORECASE,
)
STRONG_KW = re.compile(r"final|correct|best|right", re.IGNORECASE)
BOXED = re.compile(r"\\boxed\s*\{(?P<rest>(?:[^{}]|\{[^{}]*\})*)\}")
ANSWER_TAG = re.compile(r"<answer>(?P<rest>.*?)</answer>", re.IGNORECASE | re.DOTALL)
BOLD = re.compile(r"\*\*(?P<rest>[^*\n]{1,200})\*\*")
BOLD_LINE = re.compile(r"^\*\*(?P<rest>[^*\n]{1,200})\*\*[\s.]*$")
# A line that opens with a bold answer and goes on to explain it: "**A**, as ...", "**C** - because".
BOLD_LEAD = re.compile(
    r"^\*\*(?P<rest>[^*\n]{1,200})\*\*(?=\s*(?:[,:;]|[-–—]\s|\s(?:as|because|since|is|was|which)\b))",
    re.IGNORECASE,
)
THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
LABEL_ONLY = re.compile(r"^[\(\[]?(?P<label>[A-Z])[\)\]]?[.:]?$")
LABEL_LEAD = re.compile(r"^[\(\[]?(?P<label>[A-Z])(?P<sep>[\)\]][.:]?|[.:]|\s*[-–—]|(?=\s))\s*(?P<tail>.*)$")
MULTI_LABEL = re.compile(
    r"^[\(\[]?[A-Z][\)\]]?[.:]?\s*(?:,|/|&|\band\b|\bor\b|\bthen\b)\s*(?:option\s+)?[\(\[]?[A-Z][\)\]]?(?:[\s.,;:]|$)",
    re.IGNORECASE,
)
# A second labelled item after a label-led answer: "... and B. Hardener", ", B. HSV II", "and (I) if".
SECOND_ITEM = re.compile(
    r"(?:\band\b|\bor\b|&|,|;|/)\s*(?:option\s+|choice\s+)?(?:[\(\[](?P<p>[A-Z])[\)\]]|(?P<d>[A-Z])[.)]\s)"
)
BRACKETED_LEAD = re.compile(r"^[\(\[]([A-Z])[\)\]]")
IMPLICIT = ("last_line", "label_first", "closing_label", "conclusion")  # forms that state no keyword
# A clause that makes the statement after it hypothetical.
CONDITIONAL = re.compile(r"\b(?:if|had|were|unless|assuming|suppose|supposing|otherwise)\b", re.IGNORECASE)
# A concluding sentence that names the best option by a bracketed label: "Therefore, the best course
# of action would be (C) Obtain more clinical information.", "... an MRI Brain (Option B)."
CONCLUSION = re.compile(
    r"(?:^|(?<=[.!?]\s)|(?<=\n))[ \t]*(?:(?:therefore|thus|hence|so|in\s+conclusion|in\s+summary|overall)[ \t,]+"
    r"(?P<body>(?:(?![.!?]\s)[^\n])*?\b(?:best|most\s+(?:appropriate|likely|accurate|suitable|probable)|next\s+best|correct)\b"
    r"[^\n]*?)"
    # or a sentence whose subject is the superlative: "..., the most appropriate next step in management
    # would be immediate surgical exploration (D)."
    r"|(?P<subject>(?:(?![.!?]\s)[^\n])*?\bthe\s+(?:best|most\s+(?:appropriate|likely|accurate|suitable|probable)|next\s+best)"
    r"(?:\s+[\w-]+){0,6}?\s+(?:is|would\s+be)\b[^\n]*?))(?=[.!?](?:\s|$)|\n|$)",
    re.IGNORECASE,
)
NEGATION_WORD = re.compile(r"\b(?:not|never|no longer|rather than|instead of)\b|n't\b", re.IGNORECASE)
BRACKETED_LABEL = re.compile(r"[\(\[](?:[Oo]ption\s+|[Cc]hoice\s+)?([A-Z])[\)\]]|\*\*\(?([A-Z])[.)]")
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# Words that revise an earlier answer ("wait", "on reflection"): the later statement then wins.
REVISION = re.compile(
    r"\b(?:wait|actually|however|but|hmm+|on\s+(?:second\s+thought|reflection)|re-?evaluat\w*|reconsider\w*"
    r"|correction|mistake|revis\w*|instead|rather|no,)",
    re.IGNORECASE,
)
NEGATED = re.compile(r"\b(?:not|if|why|whether|unless)\s+$", re.IGNORECASE)
MATH_DELIMS = re.compile(r"\\[()\[\]]")
ELLIPSIS = re.compile(r"^(?:\.{2,}|…)\s*")
OPTION_WORD = re.compile(r"^(?:option|choice|letter)\s+", re.IGNORECASE)
CONNECTOR = re.compile(r"^(?:[-–—,;(]|because\b|since\b|as\b|which\b|given\b|due\b|is\b)", re.IGNORECASE)
# The verdict must end the statement or be followed by punctuation or an explanation:
# "no longer clear", "No evidence was found", "yes-ish" are prose, not verdicts.
YNM = re.compile(
    r"^(?P<w>yes|no|maybe)(?:\s*$|\s*[.,;:!(]|\s+[-–—]\s|\s+(?:because|since|as|given|due|based)\b)",
    re.IGNORECASE,
)
# A statement that negates or hedges ("the answer is not B", "... is unclear") retracts any
# earlier answer: it is never skipped as prose.
HEDGE = re.compile(
    r"^(?:not\b|neither\b|none\b|either\b|unclear|uncertain|ambiguous|debatable|indeterminate"
    r"|cannot\b|can't\b|can not\b|impossible\b|unknown\b)",
    re.IGNORECASE,
)
# What may follow an option's text in a statement: nothing, punctuation, or an explanation.
TEXT_TAIL = re.compile(
    r"^(?:[\s.!]*$|\s*[,;:(\[]|[.!]\s|\s+[-–—]\s|\s+(?:because|since|as|which|given|due)\b)",
    re.IGNORECASE,
)
# "B (or possibly C)": a hedge between labels in the explanation.
OR_OTHER = re.compile(
    r"\b[Oo][Rr]\s+(?:possibly\s+|perhaps\s+|maybe\s+)?(?:option\s+)?\(?([A-Z])\)?(?![A-Za-z])"
)
ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# "D, Ulna", "D - Ulna", "D -- Ulna", "D, or generalized anxiety disorder", "C, \"maybe.\"": a label,
# a comma / dash(es) / "or", then (it must be checked) that option's text.
LABEL_COMMA = re.compile(
    r"^[\(\[]?(?P<label>[A-Z])[\)\]]?\s*(?:,|;|-{1,2}|–|—)?\s*(?:\bor\s+)?(?P<tail>\S.*)$", re.DOTALL
)
# "D, because ...", "D, which ...": a label, a comma and an explanation.
COMMA_CONNECTOR = re.compile(
    r"^[\(\[]?(?P<label>[A-Z])[\)\]]?\s*,\s*(?:because|since|which|given|due\s+to)\b"
)
LONE_CAPITAL = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
LEAD_ARTICLE = re.compile(r"^(?:the|an|a)\s+", re.IGNORECASE)
QUOTES = "\"'“”‘’«»"
# "most likely C", "probably Ulna": a qualifier before the stated answer.
QUALIFIER = re.compile(
    r"^[\s,]*(?:most\s+likely|most\s+probably|likely|probably|definitely|clearly|therefore|thus)\s*[:,]?\s+",
    re.IGNORECASE,
)
# Another label named in an explanation: "(B)", "[option B]", ", B", "- option B", "B is", a lone " B.".
OTHER_LABEL = re.compile(
    r"[\(\[]\s*(?:option\s+|choice\s+)?(?P<a>[A-Z])\s*[\)\]]"
    r"|(?:^|[\s,;:/])(?:option\s+|choice\s+)?(?P<b>[A-Z])(?=\s*(?:[).,;:\]!?]|$|\s+(?:is|was|would|could|might|may|or|and)\b))",
)
# A weak statement whose rest begins like this describes the answer rather than stating it
# ("The answer is clear: ...", "This answer is consistent with ..."): it is prose, and the search
# goes on. Any other unreadable statement ends the search.
PROSE_REST = re.compile(
    r"^(?:clear|obvious|evident|apparent|straightforward|simple|tricky|complex|complicated|difficult"
    r"|challenging|subtle|nuanced|consistent|inconsistent|supported|based|found|determined|derived|related"
    r"|hidden|key|important|relevant|correct\s+because|in\s+line|within|as\s+follows|below|above"
    r"|further|more\s+|less\s+|a\s+matter|one\s+of\s+the\s+following|to\s+be\s+found|likely\s+to)",
    re.IGNORECASE,
)
PUNCT = str.maketrans({c: " " for c in string.punctuation})
REFUSAL = re.compile(
    r"\b(?:I\s*(?:'m|am)\s+(?:sorry|unable)|I\s+(?:can(?:'|no)t|cannot|won't|will\s+not)\s+"
    r"(?:help|assist|provide|answer|comply))",
    re.IGNORECASE,
)
