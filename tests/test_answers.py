"""Table-driven tests of the one answer-extraction module (rejection filtering + evaluation)."""

from __future__ import annotations

import pytest

from octomed_data.answers import AMBIGUOUS, NO_ANSWER, extract_answer, is_correct, normalize_open
from octomed_data.schema import TaskType

OPTS = [
    ("A", "Metformin"),
    ("B", "Insulin glargine"),
    ("C", "Tell the attending that he cannot fail to disclose this mistake"),
    ("D", "Report the physician to the ethics committee"),
    ("E", "Glipizide"),
]

R1_STYLE = """Okay, so the patient is a 54-year-old with newly diagnosed type 2 diabetes. Let me think.
Option A, metformin, is first-line. Option B is insulin, which is not needed here because HbA1c is 7.2%.
Wait, but the answer could be E? No, sulfonylureas cause hypoglycemia.

So the answer should be metformin.

**Final Answer**
\\boxed{A}"""

GPT4O_STYLE = """To determine the best next step, consider the ethical principles involved:

1. **Option A** is not relevant.
2. **Option D** escalates prematurely.

The most appropriate action is to encourage disclosure.

**Answer: C. Tell the attending that he cannot fail to disclose this mistake**"""

MCQ_CASES = [
    # (response, expected label, expected reason)
    ("Final answer: \\boxed{C}", "C", None),
    ("\\boxed{\\text{C}}", "C", None),
    ("\\boxed{(C)}", "C", None),
    ("The answer is (C).", "C", None),
    ("The answer is C because the attending must disclose.", "C", None),
    ("Answer: C", "C", None),
    ("answer: c", None, NO_ANSWER),  # lower-case c is not a label
    ("<answer>C</answer>", "C", None),
    ("<answer> D </answer>", "D", None),
    ("After weighing the options...\n\n**C**", "C", None),
    ("**Answer:** B", "B", None),
    ("The correct answer is Insulin glargine.", "B", None),
    ("Final answer: Glipizide", "E", None),
    ("C. Tell the attending that he cannot fail to disclose this mistake", "C", None),
    ("(E) Glipizide", "E", None),
    ("C", "C", None),
    ("The correct option is B - insulin is needed given ketosis.", "B", None),
    ("Answer: Option D", "D", None),
    # last explicit statement wins
    ("The answer is A.\nOn reflection, that ignores the ketosis.\nFinal answer: B", "B", None),
    ("Answer: B\n\nWait, reconsider.\n\n\\boxed{E}", "E", None),
    # ambiguous / unparseable: rejected, never guessed
    ("The answer is C or D.", None, AMBIGUOUS),
    ("Final answer: A and B", None, AMBIGUOUS),
    ("Final answer: C. Report the physician to the ethics committee", None, AMBIGUOUS),
    ("**A** is wrong. **B** might work.\n**D** too.", None, AMBIGUOUS),
    ("I think it is probably one of the sulfonylureas.", None, NO_ANSWER),
    ("Final answer: F", None, NO_ANSWER),  # not an option
    ("\\boxed{}", None, NO_ANSWER),
    ("", None, NO_ANSWER),
    ("Final answer: I am not sure.", None, NO_ANSWER),
    # near-misses: prose that only looks like a statement
    ("To answer this question we need the HbA1c. A 54-year-old man ...", None, NO_ANSWER),
    ("A 54-year-old man presents with polyuria.", None, NO_ANSWER),
    # <think> content is not the answer
    ("<think>Maybe the answer is A.</think>\nThe answer is (B).", "B", None),
    ("<think>Final answer: A</think>", None, NO_ANSWER),
    (R1_STYLE, "A", None),
    (GPT4O_STYLE, "C", None),
]


# Adversarial near-misses found in review: each was once accepted with a wrong or guessed label.
ADVERSARIAL_OPTS = [("A", "Aspirin"), ("B", "Metformin"), ("C", "Insulin"), ("D", "Metformin and insulin")]
ADVERSARIAL_MCQ = [
    # option text that is only a prefix of a different concept names no option
    ("The answer is Insulin resistance", None, NO_ANSWER),
    ("The answer is Aspirin-induced asthma", None, NO_ANSWER),
    ("The answer is Metformin or insulin", None, NO_ANSWER),
    ("The answer is metformin (C).", None, AMBIGUOUS),  # text and label disagree (issue 13: ambiguous)
    ("The answer is B (or possibly C)", None, AMBIGUOUS),
    # a later negating / hedging statement retracts an earlier answer
    ("The answer is B.\n\nHowever, on reflection, the answer is not B.", None, AMBIGUOUS),
    ("The answer is B.\n\nOn reflection the answer is unclear.", None, AMBIGUOUS),
    ("The correct answer is neither A nor B", None, AMBIGUOUS),
    ("Answer: not C", None, AMBIGUOUS),
    # the last clear statement wins: a final line that is only an answer revises an earlier one
    ("I first thought the answer is B. But wait.\n\n**C**", "C", None),
    ("The answer is B.\n\n**Insulin**.", "C", None),
    # a bold answer line inside later prose still retracts an earlier statement
    ("The answer is B.\n\n**C**\n\nbecause insulin is needed.", None, AMBIGUOUS),
    # still read correctly
    ("The answer is B.\n\n**B**", "B", None),
    ("Final answer: B\n\n1. **Option A** is wrong: no antiplatelet role.", "B", None),
    ("C is incorrect; the answer is B.", "B", None),
    ("The answer is Metformin and insulin", "D", None),
    ("The answer is Metformin.", "B", None),
    ("The answer is Metformin, because it is first line", "B", None),
    ("The answer is insulin (C).", "C", None),
    ("A 45-year-old man presents.\n\nFinal answer: \\boxed{A}", "A", None),
]


@pytest.mark.parametrize(("response", "label", "reason"), ADVERSARIAL_MCQ)
def test_multiple_choice_adversarial(response: str, label: str | None, reason: str | None) -> None:
    got = extract_answer(response, TaskType.TEXT_MCQ, ADVERSARIAL_OPTS)
    assert got.answer == label, got
    assert got.reason == reason, got


@pytest.mark.parametrize(("response", "label", "reason"), MCQ_CASES)
def test_multiple_choice_forms(response: str, label: str | None, reason: str | None) -> None:
    got = extract_answer(response, TaskType.TEXT_MCQ, OPTS)
    assert got.answer == label, got
    if label is None:
        assert got.reason == reason, got


def test_option_text_prefix_prefers_longest_option() -> None:
    opts = [("A", "Type 1"), ("B", "Type 1 diabetes mellitus"), ("C", "Type 2")]
    assert extract_answer("The answer is Type 1 diabetes mellitus.", "text_mcq", opts).answer == "B"
    assert extract_answer("The answer is Type 1.", "text_mcq", opts).answer == "A"


def test_imaging_classification_label_text() -> None:
    opts = [("A", "Chronic infarct"), ("B", "Acute infarct"), ("C", "Normal")]
    assert extract_answer("Final answer: acute infarct", TaskType.IMAGING_CLS, opts).answer == "B"
    assert extract_answer("The image shows **Normal**", TaskType.IMAGING_CLS, opts).answer == "C"


YNM_CASES = [
    ("Final answer: \\boxed{yes}", "yes", None),
    ("The answer is: No.", "no", None),
    ("Answer: Maybe, the evidence is mixed.", "maybe", None),
    ("Yes", "yes", None),
    ("<answer>no</answer>", "no", None),
    ("Final answer: yes or no depending on the cohort", None, AMBIGUOUS),
    ("The trial was not conclusive.", None, NO_ANSWER),
    ("Final answer: (B)", "no", None),  # options given as labels
    # yes/no words inside prose are not verdicts
    ("There is no evidence of harm. The answer is yes.", "yes", None),
    ("No evidence was found.", None, NO_ANSWER),
    ("The answer is no longer clear", None, NO_ANSWER),
    ("The answer is yes-ish", None, NO_ANSWER),
    ("The answer is maybe yes", None, AMBIGUOUS),
    ("The answer is not yes", None, AMBIGUOUS),
    ("The answer is yes because the trial met its endpoint.", "yes", None),
    ("No, it does not.", "no", None),
]


@pytest.mark.parametrize(("response", "verdict", "reason"), YNM_CASES)
def test_yes_no_maybe(response: str, verdict: str | None, reason: str | None) -> None:
    got = extract_answer(response, TaskType.YES_NO_MAYBE, [("A", "yes"), ("B", "no"), ("C", "maybe")])
    assert got.answer == verdict, got
    if verdict is None:
        assert got.reason == reason


OPEN_CASES = [
    ("Final answer: \\boxed{Right lung}", "right lung"),
    ("The answer is: the left kidney.", "left kidney"),
    ("<answer>CT</answer>", "ct"),
    ("MRI", "mri"),
    ("Squamous cell carcinoma", "squamous cell carcinoma"),
]


@pytest.mark.parametrize(("response", "text"), OPEN_CASES)
def test_open_ended(response: str, text: str) -> None:
    got = extract_answer(response, TaskType.OPEN_VQA)
    assert got.answer == text, got


def test_open_ended_long_prose_is_not_an_answer() -> None:
    prose = (
        "The image is an axial CT of the abdomen showing several structures and I would need "
        "more context to say anything definitive about what is asked here."
    )
    assert extract_answer(prose, TaskType.OPEN_QA).answer is None


@pytest.mark.parametrize(
    ("extracted", "gold", "task", "ok"),
    [
        ("C", "C", TaskType.TEXT_MCQ, True),
        ("c", "C", TaskType.MM_MCQ, True),
        ("B", "C", TaskType.TEXT_MCQ, False),
        (None, "C", TaskType.TEXT_MCQ, False),
        ("Yes", "yes", TaskType.YES_NO_MAYBE, True),
        ("maybe", "no", TaskType.YES_NO_MAYBE, False),
        ("The Left  Kidney.", "left kidney", TaskType.OPEN_VQA, True),
        ("left kidneys", "left kidney", TaskType.OPEN_VQA, False),
    ],
)
def test_is_correct(extracted, gold, task, ok) -> None:
    assert is_correct(extracted, gold, task) is ok


def test_normalize_open() -> None:
    assert normalize_open("  The  Right-Lung! ") == "right lung"


# The forms real replies use that issue 21 found unread or misread (the third-party corpus in
# tests/answer_corpus/third_party/ holds real examples of each; these pin the rules one by one).
CELLS = [
    ("A", "Neutrophils"),
    ("B", "Lymphocytes"),
    ("C", "Macrophages"),
    ("D", "Eosinophils"),
    ("E", "Basophils"),
    ("F", "Mast cells"),
    ("G", "Navicular cells"),
    ("H", "Plasma cells"),
    ("I", "Giant cells"),
]
ISSUE21_FORMS = [
    # a lead-in ending in "is:" with the answer on its own line
    ("Reasoning.\n\nThe correct answer is:\n\n(C) Macrophages", "C"),
    ("Reasoning.\n\nThe most likely answer is:\nC. Macrophages\n\nThis is because they phagocytose.", "C"),
    ("Reasoning.\n\nTherefore, the answer is:\n\n**(G) Navicular cells**", "G"),
    ("The correct answer is:\n- C. Macrophages", "C"),
    # a lone label as the last line of a long reply
    ("Long reply.\nMore text about the smear.\n\nC", "C"),
    # an answer heading without a colon, the label on the next line (also lower case, or "B) text")
    ("Long reply.\n\n### Answer\nC", "C"),
    ("Long reply.\n\n### Updated Answer\n\nc", "C"),
    ("Long reply.\n\n**Final Answer**\n\nB) Lymphocytes", "B"),
    # a bold answer that is not in the last paragraph; "the answer (G) is"; "**A**, as ..."
    ("Analysis.\n\n**C. Macrophages**\n\nThey phagocytose.\n\nOther cells play minor roles.", "C"),
    ("Considering everything, the answer (G) is navicular cells.", "G"),
    ("**A**, as neutrophils are the first responders.\n\nMore explanation.", "A"),
    # a JSON answer block; a bracketed label; a statement nested in another; after a bullet
    ('Reasoning.\n```json\n{"answer": "A"}\n```', "A"),
    ("Final answer**: Based on the analysis, the correct answer is: [I]", "I"),
    ("- The answer is C", "C"),
    # a label stated first ("(C) is the correct answer")
    ("Therefore, (C) is the correct answer.", "C"),
    ("Option C is correct.", "C"),
    ("**C. Macrophages** is the most appropriate answer.", "C"),
    # a letter in LaTeX inline math; a concluding sentence that names one bracketed label
    ("Reasoning.\n\nAnswer: \\( \\text{G} \\)", "G"),
    (
        "Reasoning.\n\nTherefore, the most likely cells are macrophages (Option C).\nMore notes follow here.",
        "C",
    ),
    ("Given the smear, the most likely cells would be macrophages (C). Neutrophils (A) come earlier.", "C"),
    # a hypothetical answer after the real one is not the answer
    ("The answer is (A). If the smear were older, the answer would be (C), making (A) right here.", "A"),
    # a bracketed label that closes its sentence: the explanation after it may name other options
    ("The answer is (C). Neutrophils (A) and lymphocytes (B) arrive at other times.", "C"),
    # the last clear statement wins: a later plain final line
    ("The answer is A.\n\nOn reflection, the cells are tissue-resident.\n\nC. Macrophages", "C"),
    # read nothing: an answer heading over an analysis of options, a list of several labels,
    # a restated option list, an unclosed <think>
    (
        "### Answer\n- **Option A**: Incorrect, too early.\n- **Option B**: Incorrect.\n- **Option C**: Correct.",
        None,
    ),
    ("The correct answer is:\nA. Neutrophils\nC. Macrophages\nD. Eosinophils", None),
    ("Options:\nA. Neutrophils\nB. Lymphocytes", None),
    # several labels called correct; an option analysis; a negated or conditional one
    ("A is correct for acute inflammation, but C is correct for chronic.", None),
    ("- B. Raised by processing. This is correct.\n- C. Lowered by heat. This is correct.", None),
    ("I do not think A is the correct answer here.", None),
    ("Therefore, the most likely cells are not neutrophils (A) but macrophages (C).", None),
    ("Thus the best marker is (A). In summary, the best cells are macrophages (C).", None),
    ("<think>The smear shows... I think the answer is C", None),
]


@pytest.mark.parametrize(("response", "label"), ISSUE21_FORMS)
def test_real_reply_forms(response: str, label: str | None) -> None:
    assert extract_answer(response, TaskType.TEXT_MCQ, CELLS).answer == label
