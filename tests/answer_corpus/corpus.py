"""Regression corpus for answer extraction (issue 13): realistic replies written for this corpus.

No reply is copied from public data. Each row: ``id``, ``form`` (the category reported by
``benchmarks/bench_answers.py``), ``task_type``, ``options``, ``reply``, ``expected_answer`` (``None``
when the reply must be rejected) and ``expected_reason`` (for rejections). The question contexts
mimic MedQA (4-5 options), MedMCQA (4 options) and PubMedQA (yes/no/maybe, with and without
labelled options). Rows come from hand-written templates filled with each context's options, plus
hand-written one-off replies.
"""

from __future__ import annotations

CONTEXTS: dict[str, dict] = {
    "medqa5_fracture": {
        "task_type": "text_mcq",
        "options": [("A", "Radius"), ("B", "Humerus"), ("C", "Scaphoid"), ("D", "Ulna"), ("E", "Clavicle")],
        "gold": "D",
        "other": "A",
        "noun": True,
    },
    "medqa4_lyme": {
        "task_type": "text_mcq",
        "options": [
            ("A", "Dermacentor tick"),
            ("B", "Ixodes tick"),
            ("C", "Aedes mosquito"),
            ("D", "Sandfly"),
        ],
        "gold": "B",
        "other": "A",
        "noun": True,
    },
    "medqa5_anxiety": {
        "task_type": "text_mcq",
        "options": [
            ("A", "Panic disorder"),
            ("B", "Social anxiety disorder"),
            ("C", "Adjustment disorder with anxiety"),
            ("D", "Generalized anxiety disorder"),
            ("E", "Illness anxiety disorder"),
        ],
        "gold": "D",
        "other": "C",
        "noun": True,
    },
    "medmcqa_vitamin": {
        "task_type": "text_mcq",
        "options": [("A", "Thiamine"), ("B", "Niacin"), ("C", "Riboflavin"), ("D", "Pyridoxine")],
        "gold": "C",
        "other": "B",
        "noun": False,
    },
    "medmcqa_nerve": {
        "task_type": "text_mcq",
        "options": [
            ("A", "Radial nerve"),
            ("B", "Ulnar nerve"),
            ("C", "Median nerve"),
            ("D", "Axillary nerve"),
        ],
        "gold": "C",
        "other": "B",
        "noun": True,
    },
    "medqa4_ethics": {
        "task_type": "text_mcq",
        "options": [
            ("A", "Disclose the error to the patient and apologize"),
            ("B", "Report the resident to the program director"),
            ("C", "Do not disclose the error because no harm occurred"),
            ("D", "Ask the attending physician to decide"),
        ],
        "gold": "A",
        "other": "D",
        "noun": False,
    },
    "medmcqa_hepatitis": {
        "task_type": "text_mcq",
        "options": [("A", "Hepatitis A"), ("B", "Hepatitis B"), ("C", "Hepatitis C"), ("D", "Hepatitis E")],
        "gold": "B",
        "other": "C",
        "noun": False,
    },
}

PUBMEDQA_LABELLED = [("A", "yes"), ("B", "no"), ("C", "maybe")]

# Templates for multiple-choice contexts. {L}/{T}/{t}: the answered label, its text, lower-cased
# text; {O}/{OT}/{ot}: another option. {expect}: "L" (read as the answered label) or a reason.
R1_HEAD = (
    "<think>\nOkay, let me work through this. The presentation narrows it down quickly. "
    "Option {O}, {ot}, came to mind first, but it does not fit the timeline.\n</think>\n\n"
)
GPT_HEAD = (
    "To answer this question, consider the key findings in the stem.\n\n"
    "1. **Option {O}** ({OT}) explains only part of the picture.\n"
    "2. The remaining findings point to a single explanation.\n\n"
)
MCQ_TEMPLATES: list[tuple[str, str, str, bool]] = [
    # (form, reply template, expected, needs a noun-like option text)
    ("label_comma_text", "The answer is {L}, {T}.", "L", False),
    ("label_comma_text", "Answer: {L}, {T}", "L", False),
    ("label_comma_text", GPT_HEAD + "Therefore, the answer is {L}, {t}.", "L", False),
    ("label_comma_text", "So the correct answer is {L}, {t}, which fits the presentation best.", "L", False),
    ("label_comma_text", "**Answer: {L}, {T}**", "L", False),
    ("label_comma_text", "The answer is ({L}), {T}.", "L", False),
    ("label_comma_text", "The best answer is {L}, the {t}.", "L", True),
    (
        "label_comma_text",
        "Thus, the answer is {L}, {T}, because the other options fit less well.",
        "L",
        False,
    ),
    ("label_dash_text", "The answer is {L} - {T}.", "L", False),
    ("label_dash_text", "Final answer: {L} -- {T}", "L", False),
    ("label_dash_text", "The correct answer is {L} — {t}.", "L", False),
    ("label_or_text", "The answer is {L}, or {t}.", "L", False),
    ("label_or_text", GPT_HEAD + "Hence the answer is {L}, or {t}.", "L", False),
    ("label_quoted_text", 'The answer is {L}, "{T}."', "L", False),
    ("label_quoted_text", "The answer is {L}, '{t}'.", "L", False),
    ("label_quoted_text", "The answer is {L}, “{T}”.", "L", False),
    ("label_paren_text", "The answer is {L}) {T}.", "L", False),
    ("label_paren_text", "The answer is {L}. {T}", "L", False),
    ("label_paren_text", "Answer: {L}: {T}", "L", False),
    ("text_then_label", "The answer is {T} ({L}).", "L", False),
    ("most_likely", "The answer is most likely {L}.", "L", False),
    ("most_likely", GPT_HEAD + "The answer is most likely {L}, {t}.", "L", False),
    ("r1_ending", R1_HEAD + "**Final Answer**\n\\boxed{{{L}}}", "L", False),
    ("r1_ending", R1_HEAD + "The answer is {L}, {T}.", "L", False),
    ("r1_ending", R1_HEAD + "**{L}. {T}**", "L", False),
    (
        "r1_ending",
        "<think>\nThe stem points at {ot}. Hmm, the answer is {O}... wait, the timeline",
        "unfinished_thought",
        False,
    ),
    ("bold_ending", GPT_HEAD + "**Answer: {L}) {T}**", "L", False),
    (
        "prose_after_answer",
        "Answer: {L}, {T}\n\nThis answer is consistent with the classic presentation.",
        "L",
        False,
    ),
    (
        "prose_after_answer",
        "The answer is {L}.\n\nThe answer is supported by the findings above.",
        "L",
        False,
    ),
    # label and option text that disagree: ambiguous in every order
    ("label_text_conflict", "The answer is {L}, {OT}.", "ambiguous", False),
    ("label_text_conflict", "The answer is {OT} ({L}).", "ambiguous", False),
    ("label_text_conflict", "The answer is {ot} (option {L}).", "ambiguous", False),
    ("label_text_conflict", "Answer: {L} - {OT}", "ambiguous", False),
    ("label_text_conflict", "The answer is {L}, or {ot}.", "ambiguous", False),
    ("label_text_conflict", "Final answer: {L}. {OT}", "ambiguous", False),
    ("label_text_conflict", "The answer is {OT}, {L}.", "ambiguous", False),
    # hedges
    ("hedge", "The answer is {L} or {O}.", "ambiguous", False),
    ("hedge", "The answer is either {L} or {O}.", "ambiguous", False),
    ("hedge", "Final answer: {L} and {O}", "ambiguous", False),
    ("hedge", "The answer is {L} (or possibly {O}).", "ambiguous", False),
    ("hedge", "The answer is not {O}.", "ambiguous", False),
    ("hedge", "The answer is A, B, C, and D.", "ambiguous", False),
    # a hypothetical earlier statement, then a final one that cannot be read
    (
        "failed_final_statement",
        "If the history were different, the answer would be {O}, {OT}. It is not.\n\n"
        "Therefore, the answer is {L}, hmm, hard to say.",
        "no_answer",
        False,
    ),
    (
        "failed_final_statement",
        "At first glance the answer is {O}.\n\nOn reflection, the answer is something not listed here.",
        "no_answer",
        False,
    ),
    (
        "failed_final_statement",
        "The answer would be {O} if the symptoms were acute.\n\nSo the answer is that we need more history.",
        "no_answer",
        False,
    ),
    # a GPT-4o-style ending with no answer keyword: no explicit statement, nothing to read
    (
        "prose_no_statement",
        GPT_HEAD + "Considering all the findings, {t} ({L}) is the most consistent choice here.",
        "no_answer",
        False,
    ),
]

YNM_TEMPLATES: list[tuple[str, str, str | None, list]] = [
    # (form, reply, expected verdict or reason, options)
    ("ynm_label_comma", "Therefore, the answer is C, maybe.", "maybe", PUBMEDQA_LABELLED),
    ("ynm_label_comma", 'the answer is C, "maybe."', "maybe", PUBMEDQA_LABELLED),
    ("ynm_label_comma", "Answer: A, yes", "yes", PUBMEDQA_LABELLED),
    ("ynm_label_comma", "The answer is B, no.", "no", PUBMEDQA_LABELLED),
    ("ynm_label_comma", "The final answer is B - no.", "no", PUBMEDQA_LABELLED),
    ("ynm_label_comma", "The answer is A, 'yes'.", "yes", PUBMEDQA_LABELLED),
    ("ynm_label_paren", "The answer is C) maybe", "maybe", PUBMEDQA_LABELLED),
    ("ynm_label_paren", "Final answer: (B)", "no", PUBMEDQA_LABELLED),
    ("ynm_label_paren", "The answer is: A. yes", "yes", PUBMEDQA_LABELLED),
    ("ynm_quoted", 'The answer is "maybe."', "maybe", PUBMEDQA_LABELLED),
    ("ynm_quoted", 'The answer is "no".', "no", PUBMEDQA_LABELLED),
    ("ynm_quoted", 'The answer is "yes."', "yes", []),
    ("ynm_plain", "The answer is maybe.", "maybe", []),
    ("ynm_plain", "Final answer: \\boxed{no}", "no", []),
    ("ynm_plain", "Answer: Yes, the cohort data support the association.", "yes", []),
    ("ynm_plain", "<think>\nThe trial was small.\n</think>\n\n**Answer: maybe**", "maybe", []),
    ("ynm_plain", "No, it does not.", "no", []),
    ("ynm_plain", "The answer is yes because the primary endpoint was met.", "yes", PUBMEDQA_LABELLED),
    (
        "failed_final_statement",
        "If parents recalled the exposure accurately, the answer would be A, yes. Otherwise it is C, maybe.\n\n"
        "Therefore, the answer is C, maybe-ish.",
        "no_answer",
        PUBMEDQA_LABELLED,
    ),
    (
        "failed_final_statement",
        'If the effect is causal, the answer is "yes." Recall bias makes that doubtful.\n\n'
        "Therefore the answer is C, perhaps.",
        "no_answer",
        PUBMEDQA_LABELLED,
    ),
    (
        "failed_final_statement",
        "If recall was accurate, the answer would be A, yes. Otherwise, C, maybe.\n\nTherefore, the answer is C, maybe.",
        "maybe",
        PUBMEDQA_LABELLED,
    ),
    (
        "failed_final_statement",
        'If we trust the registry, the answer is "yes." But recall bias is likely.\n\n'
        'Therefore the answer is C, "maybe."',
        "maybe",
        PUBMEDQA_LABELLED,
    ),
    (
        "failed_final_statement",
        "The answer would be yes in adults.\n\nFor children the answer is not established by this study.",
        "ambiguous",
        [],
    ),
    ("label_text_conflict", "The answer is A, no.", "ambiguous", PUBMEDQA_LABELLED),
    ("label_text_conflict", "The answer is yes (B).", "ambiguous", PUBMEDQA_LABELLED),
    ("label_text_conflict", "Answer: C - yes", "ambiguous", PUBMEDQA_LABELLED),
    ("hedge", "The answer is yes or maybe.", "ambiguous", PUBMEDQA_LABELLED),
    ("hedge", "The answer is A or C.", "ambiguous", PUBMEDQA_LABELLED),
    ("hedge", "The answer is unknown.", "ambiguous", []),
    ("hedge", "Final answer: maybe yes", "ambiguous", []),
    ("hedge", "The answer is not yes.", "ambiguous", PUBMEDQA_LABELLED),
]

# One-off MCQ replies: (id suffix, form, context, reply, expected label or reason)
ONE_OFF: list[tuple[str, str, str, str]] = [
    ("label_comma_text", "medqa4_lyme", "the answer is B, Ixodes tick.", "B"),
    ("label_comma_text", "medqa5_anxiety", "the answer is D, or generalized anxiety disorder.", "D"),
    ("label_comma_text", "medqa5_fracture", "The answer is D, Ulna.", "D"),
    ("label_comma_text", "medqa5_fracture", "The answer is D, the ulna.", "D"),
    ("label_comma_text", "medqa5_fracture", "Answer: D, the Ulna", "D"),
    ("label_comma_text", "medmcqa_hepatitis", "The answer is B, Hepatitis B.", "B"),
    ("label_comma_text", "medmcqa_hepatitis", "The answer is Hepatitis B.", "B"),
    (
        "label_comma_text",
        "medmcqa_vitamin",
        "The answer is C, because riboflavin deficiency causes cheilosis.",
        "C",
    ),
    (
        "label_comma_text",
        "medmcqa_vitamin",
        "The answer is C, since B is associated with pellagra.",
        "ambiguous",
    ),
    ("label_text_conflict", "medmcqa_vitamin", "the answer is riboflavin (B)", "ambiguous"),
    ("label_text_conflict", "medmcqa_vitamin", "The answer is D, Thiamine.", "ambiguous"),
    ("label_text_conflict", "medmcqa_hepatitis", "The answer is C, hepatitis B.", "ambiguous"),
    ("label_text_conflict", "medmcqa_hepatitis", "The answer is Hepatitis C, not B.", "ambiguous"),
    ("label_text_conflict", "medqa5_fracture", "The answer is B (Ulna).", "ambiguous"),
    ("label_text_conflict", "medqa5_fracture", "The answer is Ulna [option A].", "ambiguous"),
    ("hedge", "medqa5_fracture", "The answer is none of the above.", "ambiguous"),
    ("hedge", "medqa5_fracture", "Answer: unknown", "ambiguous"),
    ("hedge", "medqa5_fracture", "The answer is C or A.", "ambiguous"),
    ("hedge", "medqa5_fracture", "The answer is neither A nor D.", "ambiguous"),
    ("hedge", "medqa5_fracture", "Final answer: the ulna or the radius", "no_answer"),
    ("hedge", "medqa5_fracture", "The answer cannot be determined from the information given.", "no_answer"),
    ("article_trap", "medqa5_fracture", "The answer is: A fracture of the ulna is most likely.", "no_answer"),
    ("article_trap", "medqa5_fracture", "A 45-year-old man fell on an outstretched hand.", "no_answer"),
    ("article_trap", "medqa5_fracture", "The answer is A, B, or C depending on the film.", "ambiguous"),
    ("most_likely", "medmcqa_nerve", "The answer is most likely C, though B is possible.", "no_answer"),
    ("most_likely", "medmcqa_nerve", "The answer is probably the median nerve.", "C"),
    ("most_likely", "medmcqa_nerve", "The most likely answer is C.", "C"),
    ("most_likely", "medmcqa_nerve", "The answer is, therefore, C.", "C"),
    (
        "prose_after_answer",
        "medmcqa_nerve",
        "The answer is clear once the sensory map is drawn.\n\nAnswer: C",
        "C",
    ),
    (
        "prose_after_answer",
        "medmcqa_nerve",
        "**Answer: C**\n\nThe reasoning behind this answer is based on the thenar wasting.",
        "C",
    ),
    (
        "failed_final_statement",
        "medmcqa_nerve",
        "The answer is B.\n\nWait. The answer is C, maybe.",
        "no_answer",
    ),
    (
        "failed_final_statement",
        "medmcqa_nerve",
        "The answer is B.\n\nHmm, the answer is the one at the wrist.",
        "no_answer",
    ),
    (
        "failed_final_statement",
        "medmcqa_nerve",
        "The answer is B.\n\nFinal answer: I am not sure.",
        "no_answer",
    ),
    (
        "failed_final_statement",
        "medmcqa_nerve",
        "The answer is B.\n\nOn reflection, the answer is unclear.",
        "ambiguous",
    ),
    # The last clear statement wins (issue 21): a final line that is only an answer revises an earlier one.
    ("later_final_line", "medmcqa_nerve", "The answer is B.\n\nBut wait.\n\n**C**", "C"),
    (
        "later_final_line",
        "medmcqa_nerve",
        "The answer is B.\n\nOn reflection, the wrist.\n\nC. Median nerve",
        "C",
    ),
    ("r1_ending", "medmcqa_nerve", "<think>\nSo the answer is B.\n</think>\n\nThe answer is (C).", "C"),
    ("r1_ending", "medmcqa_nerve", "<think>\nThe answer is B? No.\n</think>\n\n\\boxed{\\text{C}}", "C"),
    ("r1_ending", "medmcqa_nerve", "<think>\nThinking about the carpal tunnel.\n</think>\n\nC", "C"),
    ("r1_ending", "medmcqa_nerve", "<think>\nFinal answer: C</think>", "no_answer"),
    (
        "r1_ending",
        "medmcqa_nerve",
        "Median nerve compression at the wrist.\n</think>\n\n**Final Answer:** \\boxed{C}",
        "C",
    ),
    ("bold_ending", "medmcqa_nerve", "After weighing the options:\n\n**C. Median nerve**", "C"),
    ("bold_ending", "medmcqa_nerve", "**B** is wrong. **C** fits.\n**D** does not.", "ambiguous"),
    ("label_comma_text", "medmcqa_hepatitis", "The answer is Hepatitis A.", "A"),
    ("label_comma_text", "medmcqa_hepatitis", "The answer is A, hepatitis a.", "A"),
    (
        "r1_ending",
        "medqa5_anxiety",
        "<think>\nSix months of worry about many things, muscle tension, poor sleep. Not panic disorder: "
        "no discrete attacks. Adjustment disorder needs a stressor within 3 months. So the answer "
        "would be D if the duration criterion holds, which it does.\n</think>\n\n"
        "The patient has excessive worry about several domains for more than six months with "
        "restlessness and insomnia.\n\n**Final Answer:** \\boxed{D}",
        "D",
    ),
    (
        "label_comma_text",
        "medqa5_anxiety",
        "The patient's symptoms include persistent, excessive worry about work, finances and health, "
        "lasting more than six months, accompanied by fatigue and difficulty concentrating.\n\n"
        "- Panic disorder requires recurrent unexpected panic attacks, which she denies.\n"
        "- Adjustment disorder follows an identifiable stressor and resolves within six months.\n\n"
        "Based on these findings, the answer is D, generalized anxiety disorder.",
        "D",
    ),
    (
        "failed_final_statement",
        "medqa5_anxiety",
        "If the worry had begun after her divorce, the answer would be C, adjustment disorder with "
        "anxiety. It began years earlier.\n\nTherefore, the answer is D, or possibly E.",
        "no_answer",
    ),
    (
        "failed_final_statement",
        "medqa4_lyme",
        "Had he been hiking in the Rocky Mountains, the answer would be A, Dermacentor tick. He was in "
        "Connecticut.\n\nTherefore, the answer is B, the deer tick (Ixodes scapularis).",
        "no_answer",
    ),
    ("none_option", "none_of_the_above", "The answer is none of the above.", "D"),
    ("none_option", "none_of_the_above", "The answer is D, none of the above.", "D"),
    ("none_option", "none_of_the_above", "The answer is A, none of the above.", "ambiguous"),
]

CONTEXTS["none_of_the_above"] = {
    "task_type": "text_mcq",
    "options": [("A", "Aspirin"), ("B", "Clopidogrel"), ("C", "Warfarin"), ("D", "None of the above")],
    "gold": "D",
    "other": "A",
    "noun": False,
}


def _row(rid: str, form: str, task_type: str, options, reply: str, expected: str) -> dict:
    reasons = ("ambiguous", "no_answer", "unfinished_thought")
    return {
        "id": rid,
        "form": form,
        "task_type": task_type,
        "options": [list(o) for o in options],
        "reply": reply,
        "expected_answer": None if expected in reasons else expected,
        "expected_reason": expected if expected in reasons else None,
    }


def build() -> list[dict]:
    rows: list[dict] = []
    for name, ctx in CONTEXTS.items():
        if name == "none_of_the_above":
            continue
        opts = dict(ctx["options"])
        label, other = ctx["gold"], ctx["other"]
        fill = {
            "L": label,
            "T": opts[label],
            "t": opts[label].lower() if ctx["noun"] else opts[label],
            "O": other,
            "OT": opts[other],
            "ot": opts[other].lower() if ctx["noun"] else opts[other],
        }
        for i, (form, tpl, expected, needs_noun) in enumerate(MCQ_TEMPLATES):
            if needs_noun and not ctx["noun"]:
                continue
            reply = tpl.format(**fill)
            rows.append(
                _row(
                    f"{name}-{i:02d}",
                    form,
                    ctx["task_type"],
                    ctx["options"],
                    reply,
                    label if expected == "L" else expected,
                )
            )
    for i, (form, reply, expected, options) in enumerate(YNM_TEMPLATES):
        rows.append(_row(f"pubmedqa-{i:02d}", form, "yes_no_maybe", options, reply, expected))
    for i, (form, name, reply, expected) in enumerate(ONE_OFF):
        ctx = CONTEXTS[name]
        rows.append(_row(f"oneoff-{i:02d}", form, ctx["task_type"], ctx["options"], reply, expected))
    return rows


ROWS = build()
