"""Every loader on the real upstream files (counts from shared/data/README.md), quarantine on
injected bad records, stable ids, and the formats with no file here (PMC-VQA, HEAD-QA), built
in their published layouts around real images."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from octomed_data.errors import ConfigError, OctomedError, SourceError
from octomed_data.images import ImageStore
from octomed_data.sources import FORMATS, iter_records
from octomed_data.sources.base import parse_lettered_options, split_answer_choices

EXPECTED_FORMATS = {
    "medqa",
    "medmcqa",
    "pubmedqa",
    "mmlu",
    "mmlu_pro",
    "medxpertqa",
    "medbullets",
    "vqa_rad",
    "slake",
    "pathvqa",
    "omnimedvqa",
    "pmc_vqa",
    "headqa",
    "imaging",
    "hf",
}


# Fingerprint-only store shared by the tests: each real image is decoded once per session.
_STORE = ImageStore(None)


def run(fmt: str, path: Path, **kw) -> tuple[list[dict], list[dict]]:
    kw.setdefault("image_store", _STORE)
    questions, quarantined = [], []
    for kind, row in iter_records(fmt, str(path), **kw):
        (questions if kind == "question" else quarantined).append(row)
    return questions, quarantined


# (format, file, --images, records, questions, quarantine reasons). Record counts are the README's.
REAL_FILES = [
    ("medqa", "medqa/phrases_no_exclude_test.jsonl", None, 1273, 1273, {}),
    ("medqa", "medqa/medqa_test_5opt.jsonl", None, 1273, 1273, {}),
    ("medqa", "medqa/medqa_input.head200.jsonl", None, 200, 200, {}),
    ("medqa", "huatuogpt_o1_eval/MedQA_USLME_test.json", None, 1273, 1273, {}),
    ("medmcqa", "medmcqa/dev.json", None, 4183, 4183, {}),
    ("medmcqa", "medmcqa/medmcqa_input.head500.jsonl", None, 500, 500, {}),
    ("pubmedqa", "pubmedqa/ori_pqal.json", None, 1000, 1000, {}),
    ("mmlu", "mmlu_medical", None, 1089, 1089, {}),
    ("mmlu", "mmlu_medical/mmlu_medical_input.jsonl", None, 1089, 1089, {}),
    ("mmlu_pro", "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json", None, 1535, 1535, {}),
    ("medxpertqa", "medxpertqa/medxpertqa_text.jsonl", None, 2450, 2450, {}),
    ("medxpertqa", "medxpertqa/medxpertqa_sampled_text_input.jsonl", None, 244, 244, {}),
    ("medxpertqa", "medxpertqa/medxpertqa_mm_input.jsonl", None, 2000, 0, {"missing_image": 2000}),
    ("medxpertqa", "medxpertqa/medxpertqa_sampled_mm_input.jsonl", None, 199, 0, {"missing_image": 199}),
    ("medbullets", "medreason_eval/medbullets_op4.jsonl", None, 308, 308, {}),
    ("medbullets", "medreason_eval/medbullets_op5.jsonl", None, 308, 308, {}),
    # 36 of the 451 test QAs are about the 12 bundled images.
    ("vqa_rad", "vqa_rad/testset.json", "vqa_rad/images", 451, 36, {"missing_image": 415}),
    ("vqa_rad", "vqa_rad/VQA_RAD_Dataset_Public.json", "vqa_rad/images", 2248, 94, {"missing_image": 2154}),
    ("slake", "slake/test.json", None, 2094, 0, {"missing_image": 2094}),
    ("slake", "slake/test_open.csv", None, 645, 0, {"missing_image": 645}),
    ("slake", "slake/test_close.csv", None, 416, 0, {"missing_image": 416}),
    # 6761 QA pairs on 858 image entries, plus the 133 entries with empty lists (991 in all).
    ("pathvqa", "pathvqa/pvqa_test.json", None, 6894, 0, {"missing_image": 6761, "no_questions": 133}),
    ("pathvqa", "pathvqa/QA_pairs_vb.json", None, 5429, 5429, {}),
    ("omnimedvqa", "omnimedvqa/MRI_CT_XRAY_300each_dataset.json", None, 900, 11, {"missing_image": 889}),
    ("omnimedvqa", "omnimedvqa/med_r1_splits/X-Ray_test.json", None, 1615, 0, {"missing_image": 1615}),
]


def test_formats_registry_is_complete():
    assert set(FORMATS) == EXPECTED_FORMATS


@pytest.mark.parametrize("fmt, rel, images, records, n_questions, reasons", REAL_FILES, ids=lambda v: str(v))
def test_real_file_counts(shared_data, fmt, rel, images, records, n_questions, reasons):
    questions, quarantined = run(
        fmt, shared_data / rel, images_dir=str(shared_data / images) if images else None
    )
    assert len(questions) + len(quarantined) == records  # every record comes out exactly once
    assert len(questions) == n_questions
    assert dict(Counter(r["reason"] for r in quarantined)) == reasons
    assert len({(r["input_file"], r["record_index"]) for r in questions + quarantined}) == records


def test_medqa_answers_and_variants(shared_data):
    four, _ = run("medqa", shared_data / "medqa/phrases_no_exclude_test.jsonl")
    five, _ = run("medqa", shared_data / "medqa/medqa_test_5opt.jsonl")
    eval_input, _ = run("medqa", shared_data / "medqa/medqa_input.head200.jsonl")
    assert four[0]["answer"] == "B" and len(four[0]["options"]) == 4 and four[0]["split"] == "test"
    assert five[0]["answer"] == "C" and [o["label"] for o in five[0]["options"]] == list("ABCDE")
    assert five[0]["answer_text"] == "Tell the attending that he cannot fail to disclose this mistake"
    assert json.loads(four[0]["metadata"])["meta_info"] == "step1"
    # The eval-input copy: options parsed out of the appended "Answer Choices:" block.
    q = eval_input[0]
    assert "Answer Choices" not in q["question"] and q["question"] == four[0]["question"]
    assert [o["text"] for o in q["options"]] == [o["text"] for o in four[0]["options"]]
    assert q["answer"] == "B" and q["question_id"] == four[0]["question_id"]


def test_medmcqa_cop_is_one_based(shared_data):
    rows, _ = run("medmcqa", shared_data / "medmcqa/dev.json")
    first = rows[0]
    assert first["answer"] == "A" and first["split"] == "dev"
    assert first["answer_text"].startswith("Impulse through myelinated fibers is slower")
    meta = json.loads(first["metadata"])
    assert meta["subject"] == "Physiology" and meta["choice_type"] == "multi"
    assert Counter(r["answer"] for r in rows) == {"A": 1348, "B": 1085, "C": 925, "D": 825}
    eval_rows, _ = run("medmcqa", shared_data / "medmcqa/medmcqa_input.head500.jsonl")
    assert [r["question_id"] for r in eval_rows[:50]] == [r["question_id"] for r in rows[:50]]


def test_pubmedqa_split_from_ground_truth_and_context(shared_data, tmp_path):
    rows, _ = run("pubmedqa", shared_data / "pubmedqa/ori_pqal.json")
    assert Counter(r["split"] for r in rows) == {"test": 500, "train": 500}
    assert {r["task_type"] for r in rows} == {"yes_no_maybe"}
    assert set(Counter(r["answer"] for r in rows)) == {"yes", "no", "maybe"}
    first = rows[0]
    assert first["question"].startswith("Context:\nBACKGROUND: Programmed cell death")
    assert first["question"].endswith(
        "Question: Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?"
    )
    assert json.loads(first["metadata"])["pmid"] == "21645374"
    # Without the ground-truth file beside it, --split decides.
    lone = tmp_path / "ori_pqal.json"
    shutil.copyfile(shared_data / "pubmedqa/ori_pqal.json", lone)
    assert {r["split"] for r in run("pubmedqa", lone, split="train")[0]} == {"train"}
    assert {r["split"] for r in run("pubmedqa", lone)[0]} == {"unknown"}


def test_mmlu_subjects_from_file_names(shared_data):
    rows, _ = run("mmlu", shared_data / "mmlu_medical")
    subjects = Counter(json.loads(r["metadata"])["subject"] for r in rows)
    assert subjects == {
        "anatomy": 135,
        "clinical_knowledge": 265,
        "college_biology": 144,
        "college_medicine": 173,
        "medical_genetics": 100,
        "professional_medicine": 272,
    }
    assert rows[0]["answer"] == "A" and rows[0]["options"][0]["text"] == "paralysis of the facial muscles."


def test_mmlu_pro_keeps_upstream_duplicates_for_ingest_to_catch(shared_data):
    rows, _ = run("mmlu_pro", shared_data / "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json")
    assert max(len(r["options"]) for r in rows) == 10
    assert len(rows) - len({r["question_id"] for r in rows}) == 95


def test_medxpertqa_text_and_mm(shared_data, tmp_path):
    rows, _ = run("medxpertqa", shared_data / "medxpertqa/medxpertqa_text.jsonl")
    first = rows[0]
    assert (
        first["question"].endswith("during shoulder surgery?") and "Answer Choices" not in first["question"]
    )
    assert len(first["options"]) == 10 and first["answer"] == "E"
    assert json.loads(first["metadata"])["id"] == "Text-0"
    # MM records with their images present become multimodal questions.
    lines = (shared_data / "medxpertqa/medxpertqa_mm_input.jsonl").read_text().splitlines()[:3]
    src = tmp_path / "mm_input.jsonl"
    src.write_text("\n".join(lines) + "\n")
    images = tmp_path / "images"
    images.mkdir()
    real = sorted((shared_data / "vqa_rad/images").glob("*.jpg"))
    for i, ref in enumerate(im["image_path"] for im in json.loads(lines[0])["images"]):
        shutil.copyfile(real[i], images / ref)
    store = ImageStore(str(tmp_path / "out"))
    q, x = run("medxpertqa", src, images_dir=str(images), image_store=store)
    assert len(q) == 1 and q[0]["task_type"] == "mm_mcq" and len(q[0]["images"]) == 2
    assert q[0]["answer"] == "A" and q[0]["split"] == "test"
    assert Counter(r["reason"] for r in x) == {"missing_image": 2}


def test_vqa_rad_task_types_and_splits(shared_data):
    rows, _ = run(
        "vqa_rad",
        shared_data / "vqa_rad/VQA_RAD_Dataset_Public.json",
        images_dir=str(shared_data / "vqa_rad/images"),
    )
    assert Counter(r["split"] for r in rows) == {"train": 58, "test": 36}
    for r in rows:
        meta = json.loads(r["metadata"])
        if r["answer"] in ("yes", "no") and meta["answer_type"] == "CLOSED":
            assert r["task_type"] == "yes_no_maybe"
        if meta["answer_type"] == "OPEN" and r["answer"] not in ("yes", "no"):
            assert r["task_type"] == "open_vqa"
        assert len(r["images"]) == 1 and r["anatomy"] in ("head", "chest", "abdomen")
    test_rows, _ = run(
        "vqa_rad", shared_data / "vqa_rad/testset.json", images_dir=str(shared_data / "vqa_rad/images")
    )
    assert {r["split"] for r in test_rows} == {"test"}
    # The same image gets the same content hash from either file.
    by_name = {json.loads(r["metadata"])["image_name"]: r["images"][0]["sha256"] for r in rows}
    for r in test_rows:
        assert r["images"][0]["sha256"] == by_name.get(
            json.loads(r["metadata"])["image_name"], r["images"][0]["sha256"]
        )


def test_slake_with_images_folder(shared_data, tmp_path):
    # No SLAKE images are public in git: place a real radiology image where xmlab102's belongs.
    # (English questions of this file are about xmlab102, Chinese ones about xmlab1.)
    for name in ("xmlab102", "xmlab1"):
        (tmp_path / name).mkdir()
        shutil.copyfile(shared_data / "vqa_rad/images/synpic42202.jpg", tmp_path / name / "source.jpg")
    rows, quarantined = run("slake", shared_data / "slake/test.json", images_dir=str(tmp_path))
    assert len(rows) + len(quarantined) == 2094
    assert rows and {json.loads(r["metadata"])["img_id"] for r in rows} == {1, 102}
    assert {json.loads(r["metadata"])["lang"] for r in rows} == {"en", "zh"}
    assert rows[0]["modality"] == "CT" and rows[0]["anatomy"] == "lung" and rows[0]["answer"] == "ct"
    assert {r["task_type"] for r in rows} <= {"open_vqa", "yes_no_maybe"}
    closed, _ = run("slake", shared_data / "slake/test_close.csv", images_dir=str(tmp_path))
    # Closed questions are mostly yes/no; "lung or liver?" style choices stay short open answers.
    assert closed and Counter(r["answer"] in ("yes", "no") for r in closed)[True] > len(closed) / 2
    for r in closed:
        assert r["task_type"] == ("yes_no_maybe" if r["answer"] in ("yes", "no") else "open_vqa")


def test_pathvqa_lxmert_one_record_per_pair(shared_data, tmp_path):
    shutil.copyfile(shared_data / "vqa_rad/images/synpic54610.jpg", tmp_path / "test_0001.jpg")
    rows, quarantined = run("pathvqa", shared_data / "pathvqa/pvqa_test.json", images_dir=str(tmp_path))
    assert len(rows) + len(quarantined) == 6761 + 133
    assert {json.loads(r["metadata"])["img_id"] for r in rows} == {"test_0001"}
    assert rows[0]["answer"] == "squamous cell carcinoma" and rows[0]["task_type"] == "open_vqa"
    assert rows[1]["answer"] == "yes" and rows[1]["task_type"] == "yes_no_maybe"
    doc = json.loads((shared_data / "pathvqa/pvqa_test.json").read_text())
    pairs = doc[1]["sentf"]["pvqa"]
    assert [r["question"] for r in rows] == [q.strip() for q in pairs]
    assert [r["answer"] for r in rows] == [next(iter(d)) for d in doc[1]["labelf"]["pvqa"]]
    empty = [q for q in quarantined if q["reason"] == "no_questions"]
    assert len(empty) == sum(1 for e in doc if not e["sentf"]["pvqa"]) == 133
    assert json.loads(empty[0]["raw"])["img_id"] == "test_0000"


def test_pathvqa_lxmert_every_entry_is_accounted_for(tmp_path):
    entries = [
        {"img_id": "a", "sentf": {"pvqa": ["Q1?", "Q2?"]}, "labelf": {"pvqa": [{"yes": 1}, {"tumor": 1}]}},
        {"img_id": "b", "sentf": {"pvqa": []}, "labelf": {"pvqa": []}},  # empty entry
        {"img_id": "c", "sentf": {"pvqa": ["Q3?"]}, "labelf": {"pvqa": []}},  # question, no answer
        {"img_id": "d", "sentf": {"pvqa": ["Q4?"]}, "labelf": {"pvqa": [{"no": 1}, {"extra": 1}]}},
        {"img_id": "e", "sentf": ["not", "a", "dict"], "labelf": {}},  # wrong shape
        {"img_id": "f", "sentf": {"pvqa": []}, "labelf": {"pvqa": [{"orphan": 1}]}},  # answers only
        "not an object",
    ]
    path = tmp_path / "pvqa_train.json"
    path.write_text(json.dumps(entries))
    rows, quarantined = run("pathvqa", path, images_dir=str(tmp_path))
    assert rows == []
    assert [(q["record_index"], q["reason"]) for q in quarantined] == [
        (0, "missing_image"),
        (1, "missing_image"),
        (2, "no_questions"),
        (3, "missing_answer"),
        (4, "missing_image"),
        (5, "malformed_record"),  # d's surplus answer
        (6, "malformed_record"),  # e
        (7, "malformed_record"),  # f
        (8, "malformed_record"),  # the string entry
    ]


def test_pathvqa_textbook_pairs_are_text_questions(shared_data):
    rows, _ = run("pathvqa", shared_data / "pathvqa/QA_pairs_vb.json")
    assert Counter(r["task_type"] for r in rows) == {"yes_no_maybe": 2852, "open_qa": 2577}
    assert all(not r["images"] for r in rows) and {r["split"] for r in rows} == {"train"}
    assert rows[0]["answer"] == "the histone subunits"


def test_omnimedvqa_both_layouts(shared_data, tmp_path):
    rows, _ = run("omnimedvqa", shared_data / "omnimedvqa/MRI_CT_XRAY_300each_dataset.json")
    # Records 18..209 are in the MR block (0-299), 310 and 359 in CT, 856 in X-Ray.
    assert Counter(r["modality"] for r in rows) == {"MR": 8, "CT": 2, "X-Ray": 1}
    assert all(r["task_type"] == "mm_mcq" and r["split"] == "test" for r in rows)
    # Med-R1: options only inside `problem`, answer inside <answer> tags.
    (tmp_path / "Images/MIAS").mkdir(parents=True)
    shutil.copyfile(shared_data / "omnimedvqa/images/mdb146.png", tmp_path / "Images/MIAS/mdb084.png")
    r1, _ = run(
        "omnimedvqa", shared_data / "omnimedvqa/med_r1_splits/X-Ray_test.json", images_dir=str(tmp_path)
    )
    first = r1[0]
    assert first["question"] == "What imaging technique is utilized to capture this picture?"
    assert [o["text"] for o in first["options"]] == ["X-ray", "MRI", "Echocardiogram", "Mammography"]
    assert first["answer"] == "D" and first["modality"] == "X-Ray"


def test_option_parsers():
    stem, opts = split_answer_choices("Q?\nAnswer Choices: (A) one (B) two, unlike (D) (C) three (D) four")
    assert stem == "Q?" and opts == [("A", "one"), ("B", "two, unlike (D)"), ("C", "three"), ("D", "four")]
    stem, opts = parse_lettered_options("Which? A)X-ray, B)MRI, C)CT scan, D)PET", "suffix")
    assert stem == "Which?" and opts == [("A", "X-ray"), ("B", "MRI"), ("C", "CT scan"), ("D", "PET")]
    assert parse_lettered_options("no options here", "paren") == ("no options here", [])


def test_quarantine_reasons_on_injected_bad_lines(shared_data, tmp_path):
    good = (shared_data / "medqa/phrases_no_exclude_test.jsonl").read_text().splitlines()[:5]
    base = json.loads(good[0])
    bad = [
        '{"question": "truncated line',  # malformed JSON
        "[1, 2, 3]",  # not an object
        json.dumps({**base, "answer_idx": "F", "answer": None}),  # answer not among the options
        json.dumps({**base, "answer_idx": "", "answer": ""}),  # missing answer
        json.dumps({**base, "answer_idx": "A"}),  # answer text disagrees with option A
        json.dumps({**base, "question": "   "}),  # empty question
        json.dumps({**base, "options": {"A": "only one"}, "answer_idx": "A", "answer": "only one"}),
        json.dumps({**base, "options": "not options"}),
    ]
    path = tmp_path / "mixed_test.jsonl"
    path.write_text("\n".join(good[:2] + bad + good[2:]) + "\n\n")
    rows, quarantined = run("medqa", path)
    assert len(rows) == 5 and len(quarantined) == len(bad)
    assert [q["reason"] for q in quarantined] == [
        "malformed_json",
        "malformed_json",
        "answer_not_in_options",
        "missing_answer",
        "answer_mismatch",
        "missing_question",
        "too_few_options",
        "malformed_record",
    ]
    assert [q["record_index"] for q in quarantined] == list(range(2, 10))
    assert all(q["raw"] for q in quarantined)
    # The valid records are exactly the ones a clean file gives, ids included.
    clean = tmp_path / "clean_test.jsonl"
    clean.write_text("\n".join(good) + "\n")
    assert [r["question_id"] for r in rows] == [r["question_id"] for r in run("medqa", clean)[0]]


def test_quarantine_for_bad_csv_and_medmcqa_rows(tmp_path):
    csv_path = tmp_path / "anatomy_test.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Q1?", "a", "b", "c", "d", "A"])
        w.writerow(["Q2?", "a", "b", "c"])  # too few columns
        w.writerow(["Q3?", "a", "b", "c", "d", "Z"])  # answer not an option
        w.writerow(["Q4?", "a", "b", "c", "d", "maybe"])  # not a label
    rows, quarantined = run("mmlu", csv_path)
    assert len(rows) == 1 and [q["reason"] for q in quarantined] == [
        "malformed_row",
        "answer_not_in_options",
        "invalid_answer",
    ]
    mc = tmp_path / "dev.json"
    rec = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2}
    mc.write_text(
        "\n".join(json.dumps({**rec, **change}) for change in ({}, {"cop": 0}, {"cop": None}, {"cop": "x"}))
    )
    rows, quarantined = run("medmcqa", mc)
    assert rows[0]["answer"] == "B"
    assert [q["reason"] for q in quarantined] == ["invalid_answer", "missing_answer", "invalid_answer"]


def test_ids_are_stable_across_runs_and_files(shared_data, tmp_path):
    first = [r["question_id"] for r in run("medxpertqa", shared_data / "medxpertqa/medxpertqa_text.jsonl")[0]]
    second = [
        r["question_id"] for r in run("medxpertqa", shared_data / "medxpertqa/medxpertqa_text.jsonl")[0]
    ]
    assert first == second and len(set(first)) == 2450
    # Same question from another file / position: same id (ids come from content, not provenance).
    lines = (shared_data / "medxpertqa/medxpertqa_text.jsonl").read_text().splitlines()
    moved = tmp_path / "reordered.jsonl"
    moved.write_text("\n".join([lines[5], lines[0]]) + "\n")
    again = [r["question_id"] for r in run("medxpertqa", moved)[0]]
    assert again == [first[5], first[0]]


def test_pmc_vqa_published_csv_layout(shared_data, tmp_path):
    # No PMC-VQA file is public in git: a CSV in the published column layout around real images.
    images = tmp_path / "figures"
    images.mkdir()
    shutil.copyfile(shared_data / "vqa_rad/images/synpic29265.jpg", images / "PMC1064097_F1.jpg")
    shutil.copyfile(shared_data / "vqa_rad/images/synpic54610.jpg", images / "PMC1064098_F2.jpg")
    header = [
        "Figure_path",
        "Question",
        "Answer",
        "Choice A",
        "Choice B",
        "Choice C",
        "Choice D",
        "Answer_label",
    ]
    rows = [
        [
            "PMC1064097_F1.jpg",
            "What is the uptake pattern in the breast?",
            "Focal uptake pattern",
            "A:Diffuse uptake pattern",
            "B:Focal uptake pattern",
            "C:No uptake pattern",
            "D:Cannot determine from the information given",
            "B",
        ],
        [
            "PMC1064098_F2.jpg",
            "Which imaging modality is shown?",
            "MRI",
            " A:CT",
            " B:MRI",
            " C:X-ray",
            " D:PET",
            "B",
        ],
        ["PMC1064099_F3.jpg", "Missing figure?", "CT", "A:CT", "B:MRI", "C:X-ray", "D:PET", "A"],
        ["PMC1064097_F1.jpg", "Label outside options?", "CT", "A:CT", "B:MRI", "C:X-ray", "D:PET", "E"],
        ["PMC1064097_F1.jpg", "Answer disagrees?", "PET", "A:CT", "B:MRI", "C:X-ray", "D:PET", "A"],
    ]
    path = tmp_path / "test_clean.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    questions, quarantined = run("pmc_vqa", path, images_dir=str(images))
    assert len(questions) == 2 and questions[0]["answer"] == "B"
    assert [o["text"] for o in questions[1]["options"]] == ["CT", "MRI", "X-ray", "PET"]
    assert questions[0]["task_type"] == "mm_mcq" and questions[0]["split"] == "test"
    assert [q["reason"] for q in quarantined] == ["missing_image", "answer_not_in_options", "answer_mismatch"]


def test_headqa_published_json_layout(shared_data, tmp_path):
    # No HEAD-QA file is public in git: a small file in the published layout.
    shutil.copyfile(shared_data / "vqa_rad/images/synpic42202.jpg", tmp_path / "img_1.jpg")
    answers = [
        {"aid": i, "atext": t}
        for i, t in enumerate(["Gentamicin", "Erythromycin", "Ciprofloxacin", "Cefotaxime"], 1)
    ]
    doc = {
        "version": "1.0",
        "language": "en",
        "exams": {
            "Cuaderno_2013_1_B": {
                "name": "Cuaderno_2013_1_B",
                "year": "2013",
                "category": "pharmacology",
                "data": [
                    {
                        "qid": "1",
                        "qtext": "The antibiotic of choice for H. influenzae b meningitis is:",
                        "ra": "4",
                        "image": "",
                        "answers": answers,
                    },
                    {
                        "qid": "2",
                        "qtext": "Which finding is shown in the image?",
                        "ra": "1",
                        "image": "img_1.jpg",
                        "answers": answers,
                    },
                    {
                        "qid": "3",
                        "qtext": "Right answer outside the list?",
                        "ra": "7",
                        "image": "",
                        "answers": answers,
                    },
                    {"qid": "4", "qtext": "No right answer?", "image": "", "answers": answers},
                ],
            }
        },
    }
    path = tmp_path / "test_HEAD_EN.json"
    path.write_text(json.dumps(doc))
    questions, quarantined = run("headqa", path, images_dir=str(tmp_path))
    assert [q["answer"] for q in questions] == ["D", "A"] and questions[0]["answer_text"] == "Cefotaxime"
    assert [q["task_type"] for q in questions] == ["text_mcq", "mm_mcq"] and questions[0]["split"] == "test"
    assert json.loads(questions[0]["metadata"])["category"] == "pharmacology"
    assert [q["reason"] for q in quarantined] == ["answer_not_in_options", "missing_answer"]


def _class_folders(shared_data: Path, root: Path) -> Path:
    """A real-image classification tree: 11 OmniMedVQA PNGs + 12 VQA-RAD JPEGs in 3 classes."""
    omni = sorted((shared_data / "omnimedvqa/images").glob("*.png"))
    rad = sorted((shared_data / "vqa_rad/images").glob("*.jpg"))
    classes = {"knee_or_limb": omni[:6], "abdomen_or_chest": omni[6:], "radiograph": rad}
    for label, files in classes.items():
        (root / label).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, root / label / f.name)
    return root


def test_imaging_folder_stratified_sampling(shared_data, tmp_path):
    root = _class_folders(shared_data, tmp_path / "tree")
    store = ImageStore(None)
    q1, x1 = run("imaging", root, image_store=store, per_class=4, seed=7, modality="MR")
    assert len(q1) + len(x1) == 23
    assert len(q1) == 12 and Counter(json.loads(r["metadata"])["label"] for r in q1) == {
        "knee_or_limb": 4,
        "abdomen_or_chest": 4,
        "radiograph": 4,
    }
    assert Counter(r["reason"] for r in x1) == {"not_sampled": 11}
    for r in q1:
        label = json.loads(r["metadata"])["label"]
        texts = [o["text"] for o in r["options"]]
        assert len(texts) == 3 and len(set(texts)) == 3  # num_options capped by 3 labels
        assert dict((o["label"], o["text"]) for o in r["options"])[r["answer"]] == label.replace("_", " ")
        assert r["task_type"] == "imaging_cls" and r["question"] == (
            "Which of the following is the correct classification of this MR image?"
        )
    # Same seed -> same sample, same options; another seed -> another sample.
    q2, _ = run("imaging", root, image_store=store, per_class=4, seed=7, modality="MR")
    assert [(r["question_id"], r["answer"]) for r in q2] == [(r["question_id"], r["answer"]) for r in q1]
    q3, _ = run("imaging", root, image_store=store, per_class=4, seed=8, modality="MR")
    assert {r["record_index"] for r in q3} != {r["record_index"] for r in q1}
    # Without per_class everything is used; answers are spread over option positions.
    q_all, x_all = run("imaging", root, image_store=store)
    assert len(q_all) == 23 and not x_all
    assert len({r["answer"] for r in q_all}) == 3


def test_imaging_csv_with_dicom_and_modality_labels(tmp_path):
    from octomed_data.ingest import SAMPLE_DATA_DIR

    labels = SAMPLE_DATA_DIR / "imaging" / "labels.csv"
    questions, quarantined = run("imaging", labels, per_class=3, seed=0)
    assert len(questions) + len(quarantined) == 16
    assert Counter(q["reason"] for q in quarantined) == {"unreadable_image": 5, "not_sampled": 4}
    # The labels are modalities, so the question must not name the modality.
    for q in questions:
        assert q["question"] == "Which of the following is the correct classification of this medical image?"
        assert q["modality"] == json.loads(q["metadata"])["label"] or q["modality"] is None
    with pytest.raises(ConfigError):
        run("imaging", labels, per_class="many")


def test_entry_point_errors(shared_data, tmp_path):
    with pytest.raises(OctomedError) as err:
        iter_records("medqa_v2", str(shared_data / "medqa"))
    assert "unknown format 'medqa_v2'" in str(err.value) and "pubmedqa" in str(err.value)
    with pytest.raises(SourceError) as err:
        iter_records("medqa", str(tmp_path / "missing.jsonl"))
    assert "does not exist" in str(err.value)
    with pytest.raises(ConfigError) as err:
        iter_records("medqa", str(shared_data / "medqa/medqa_test_5opt.jsonl"), per_class=3)
    assert "unknown option" in str(err.value)
    with pytest.raises(SourceError):
        iter_records("vqa_rad", str(shared_data / "vqa_rad/testset.json"), images_dir=str(tmp_path / "nope"))
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(SourceError) as err:
        list(iter_records("mmlu_pro", str(broken)))
    assert "not valid JSON" in str(err.value)


def test_pubmedqa_folder_reads_ground_truth_as_split_list_only(shared_data):
    rows, quarantined = run("pubmedqa", shared_data / "pubmedqa")
    assert len(rows) == 1000 and quarantined == []
    assert Counter(r["split"] for r in rows) == {"test": 500, "train": 500}


def test_every_record_maps_to_the_raw_answer(shared_data):
    """Field mapping against the raw files, record by record (not just the first one)."""
    dev = [json.loads(line) for line in (shared_data / "medmcqa/dev.json").read_text().splitlines()]
    rows, _ = run("medmcqa", shared_data / "medmcqa/dev.json")
    assert len(rows) == len(dev)
    for raw, row in zip(dev, rows, strict=True):
        options = {o["label"]: o["text"] for o in row["options"]}
        assert options == {k: raw[f"op{k.lower()}"].strip() for k in "ABCD"}
        assert row["answer"] == "ABCD"[raw["cop"] - 1] and row["question"] == raw["question"].strip()
    pro = json.loads((shared_data / "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json").read_text())
    rows, _ = run("mmlu_pro", shared_data / "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json")
    assert len(rows) == len(pro)
    for raw, row in zip(pro, rows, strict=True):
        assert [(o["label"], o["text"]) for o in row["options"]] == [
            (k, str(v).strip()) for k, v in raw["options"].items()
        ]
        assert row["answer"] == raw["answer_idx"] and row["answer_text"] == raw["answer"].strip()
    bullets = [
        json.loads(line)
        for line in (shared_data / "medreason_eval/medbullets_op5.jsonl").read_text().splitlines()
    ]
    rows, _ = run("medbullets", shared_data / "medreason_eval/medbullets_op5.jsonl")
    assert [r["answer"] for r in rows] == [b["answer_idx"] for b in bullets]


def test_jsonl_with_a_bad_first_line_quarantines_only_that_line(shared_data, tmp_path):
    good = (shared_data / "medqa/phrases_no_exclude_test.jsonl").read_text().splitlines()[:3]
    for bad in ("[1, 2, 3]", '"just a string"', "{not json"):
        path = tmp_path / "first_bad_test.jsonl"
        path.write_text("\n".join([bad, *good]) + "\n")
        rows, quarantined = run("medqa", path)
        assert len(rows) == 3 and [q["record_index"] for q in quarantined] == [0], bad
        assert quarantined[0]["reason"] == "malformed_json"
    # A minified one-line JSON array is still one document.
    one_line = tmp_path / "one_line_test.json"
    one_line.write_text(json.dumps([json.loads(g) for g in good]))
    assert len(run("medqa", one_line)[0]) == 3


def test_csv_empty_cell_rows_and_non_utf8_rows_are_quarantined(tmp_path):
    path = tmp_path / "anatomy_test.csv"
    path.write_text('Q1?,a,b,c,d,A\n\n,,,,,\n"Q2?",a,b,c,d,B\n')
    rows, quarantined = run("mmlu", path)
    # The blank line is not a record; the row of empty cells is one, and is not lost silently.
    assert [r["record_index"] for r in rows] == [0, 2]
    assert [(q["record_index"], q["reason"], q["detail"]) for q in quarantined] == [
        (1, "malformed_row", "empty row")
    ]
    # One Latin-1 byte costs its row, not the file (tests/sources/test_loader_bugs.py covers all readers).
    latin = tmp_path / "latin_test.csv"
    latin.write_bytes("Q?,caf\xe9,b,c,d,A\nQ3?,a,b,c,d,C\n".encode("latin-1"))
    rows, quarantined = run("mmlu", latin)
    assert [r["record_index"] for r in rows] == [1]
    assert [(q["record_index"], q["reason"]) for q in quarantined] == [(0, "malformed_row")]
    assert "not UTF-8" in quarantined[0]["detail"] and "caf\ufffd" in quarantined[0]["raw"]
