"""The three loader bugs found trying the CLI as a new user: relative class folders, image URIs
relative to the working directory, and one bad byte failing a whole file."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from cli import main
from octomed_data import storage
from octomed_data.images import ImageStore
from octomed_data.layout import IngestFolder
from octomed_data.schema import QUARANTINE_SCHEMA, QUESTION_SCHEMA
from octomed_data.sources import iter_records

BAD = b"\xe9\xff"  # not UTF-8 (Latin-1 "é" and a byte no encoding of text produces)


def class_tree(shared_data: Path, root: Path) -> Path:
    for label, files in (
        ("CT", sorted((shared_data / "omnimedvqa/images").glob("*.png"))[:3]),
        ("XR", sorted((shared_data / "vqa_rad/images").glob("*.jpg"))[:3]),
    ):
        (root / label).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, root / label / f.name)
    return root


def read(out: str) -> tuple[list[dict], list[dict]]:
    folder = IngestFolder(out)
    q = storage.Dataset(folder.questions, QUESTION_SCHEMA).read_all().to_pylist()
    x = storage.Dataset(folder.quarantine, QUARANTINE_SCHEMA).read_all().to_pylist()
    return q, x


@pytest.mark.parametrize("images_flag", [False, True], ids=["plain", "with-images-flag"])
def test_relative_class_folder_from_the_cli(shared_data, tmp_path, monkeypatch, capsys, images_flag):
    class_tree(shared_data, tmp_path / "cls")
    monkeypatch.chdir(tmp_path)
    argv = ["ingest", "imaging", "cls", "--out", "out"] + (["--images", "cls"] if images_flag else [])
    assert main(argv) == 0, capsys.readouterr().err
    questions, quarantined = read(str(tmp_path / "out"))
    assert quarantined == [] and len(questions) == 6
    # The same tree given absolutely asks the same questions (same ids).
    assert main(["ingest", "imaging", str(tmp_path / "cls"), "--out", str(tmp_path / "abs")]) == 0
    assert sorted(q["question_id"] for q in read(str(tmp_path / "abs"))[0]) == sorted(
        q["question_id"] for q in questions
    )


def test_image_uris_are_absolute_with_a_relative_out(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images = shared_data / "vqa_rad/images"
    assert (
        main(
            [
                "ingest",
                "vqa_rad",
                str(shared_data / "vqa_rad/testset.json"),
                "--images",
                str(images),
                "--out",
                "out2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    questions, _ = read("out2")
    uris = [im["uri"] for q in questions for im in q["images"]]
    assert len(uris) == 36 and all(
        os.path.isabs(u) and u.startswith(str(tmp_path / "out2" / "images")) for u in uris
    )
    monkeypatch.chdir(shared_data)  # read from anywhere else
    assert all(storage.exists(u) for u in uris)
    # One rule for every store: a relative root is made absolute, a URI stays as it is.
    assert ImageStore("rel").images_uri == str(shared_data / "rel" / "images")
    assert ImageStore("s3://bucket/run").images_uri == "s3://bucket/run/images"


def _headqa(bad_question: bool) -> bytes:
    answers = [{"aid": i, "atext": t} for i, t in enumerate(["Gentamicin", "Erythromycin", "Cefotaxime"], 1)]
    data = [
        {"qid": str(i), "qtext": f"Question number {i}?", "ra": "3", "image": "", "answers": answers}
        for i in range(1, 4)
    ]
    text = json.dumps({"version": "1.0", "exams": {"Cuaderno_2013_1_B": {"name": "C", "data": data}}})
    raw = text.encode()
    return raw.replace(b"Question number 2?", b"Question n" + BAD + b"mero 2?") if bad_question else raw


def _csv(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


def test_one_bad_byte_quarantines_one_record_in_every_reader(shared_data, tmp_path):
    """HEAD-QA (a JSON object walked exam by exam), JSON arrays, PubMedQA (object by PMID),
    PathVQA, CSV and JSON Lines: the record with the bad byte is quarantined, the rest kept."""
    medqa = [
        json.loads(x)
        for x in (shared_data / "medqa/phrases_no_exclude_test.jsonl").read_text().splitlines()[:3]
    ]
    pubmed = json.loads((shared_data / "pubmedqa/ori_pqal.json").read_text())
    pubmed = dict(list(pubmed.items())[:3])
    textbook = json.loads((shared_data / "pathvqa/QA_pairs_vb.json").read_text())[:3]
    cases = {
        "headqa": ("dev_HEAD_EN.json", _headqa(True)),
        "medqa": ("huatuo_test.json", json.dumps(medqa).encode()),  # a JSON array
        "pubmedqa": ("ori_pqal.json", json.dumps(pubmed).encode()),
        "pathvqa": ("QA_pairs_vb.json", json.dumps(textbook).encode()),
        "mmlu": ("anatomy_test.csv", _csv([["Q1?", "a", "b", "c", "d", "A"]] * 3)),
        "medbullets": ("op4_test.jsonl", "\n".join(json.dumps(r) for r in medqa).encode()),
    }
    for fmt, (name, raw) in cases.items():
        if fmt != "headqa":
            # Put the bad byte inside the second record's question text.
            marker = {
                "medqa": medqa[1]["question"][:20],
                "medbullets": medqa[1]["question"][:20],
                "pubmedqa": list(pubmed.values())[1]["QUESTION"][:20],
                "pathvqa": textbook[1]["Questions"][:10],
                "mmlu": None,
            }[fmt]
            if marker is None:
                raw = _csv(
                    [
                        ["Q1?", "a", "b", "c", "d", "A"],
                        ["Q2?", "x", "y", "z", "w", "B"],
                        ["Q3?", "a", "b", "c", "d", "C"],
                    ]
                )
                raw = raw.replace(b"Q2?", b"Q" + BAD + b"2?")
            else:
                enc = json.dumps(marker)[1:-1].encode()
                assert enc in raw, fmt
                raw = raw.replace(enc, enc[:5] + BAD + enc[5:], 1)
        path = tmp_path / fmt / name
        path.parent.mkdir()
        path.write_bytes(raw)
        rows = list(iter_records(fmt, str(path), image_store=ImageStore(None)))
        bad = [r for k, r in rows if k == "quarantine"]
        assert len(rows) == 3 and len(bad) == 1, (fmt, bad)
        assert bad[0]["record_index"] == 1, fmt
        assert "not UTF-8" in bad[0]["detail"] and "\ufffd" in bad[0]["raw"], fmt
        # Quarantine rows are stored as valid UTF-8 Parquet (no lone surrogates).
        storage.Dataset(str(tmp_path / "q" / fmt), QUARANTINE_SCHEMA).write_shard(0, bad)
    # The good HEAD-QA file is unaffected.
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "dev_HEAD_EN.json").write_bytes(_headqa(False))
    assert [k for k, _ in iter_records("headqa", str(tmp_path / "good" / "dev_HEAD_EN.json"))] == [
        "question"
    ] * 3
