"""Input hygiene at ingest (issue 25), on real records from ../shared/data.

* Control characters other than newline and tab (NUL, ESC, DEL, C1, bidi overrides and isolates, a
  lone CR) are stripped from question, option and answer texts before ids are made, and counted
  (the row's metadata ``control_chars_removed``, the loader context's ``counts``).
* Gzipped inputs (``.jsonl.gz``, ``.json.gz``, ``.csv.gz``) read exactly as the file they hold;
  archives (``.zip``, ``.tar.gz``, ``.tgz``, ``.bz2``, ``.xz``) are refused in one line naming the file.
* A damaged input (corrupt Parquet, broken gzip) is an error naming the file.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
import shutil
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from octomed_data import storage
from octomed_data.errors import OctomedError, SourceError
from octomed_data.images import ImageStore
from octomed_data.schema import QUESTION_SCHEMA, question_row, strip_controls
from octomed_data.sources import iter_records
from octomed_data.sources import paths as source_paths
from octomed_data.stages.ingest import ingest

MEDQA = "medqa/phrases_no_exclude_test.jsonl"
# Everything that must go, and what must stay.
CONTROLS = [
    "\x00",
    "\x1b",
    "\x07",
    "\x7f",
    "\x85",
    "\x9b",
    "\u202e",
    "\u202d",
    "\u2066",
    "\u2069",
    "\u200f",
    "\r",
]
LEFT_ALONE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _records(fmt: str, path: Path | str, **kw) -> list[tuple[str, dict]]:
    kw.setdefault("image_store", ImageStore(None))
    return list(iter_records(fmt, str(path), **kw))


def _medqa_lines(shared_data: Path, n: int) -> list[dict]:
    with (shared_data / MEDQA).open() as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def _inject(text: str, chars: list[str]) -> str:
    """``text`` with ``chars`` put between its words (removing them gives ``text`` back)."""
    words = text.split(" ")
    for i, c in enumerate(chars):
        at = 1 + (i * 7) % max(1, len(words) - 1)
        words[at] = c + words[at]
    return " ".join(words)


def test_control_characters_are_stripped_and_counted(shared_data, tmp_path):
    clean = _medqa_lines(shared_data, 6)
    dirty = json.loads(json.dumps(clean))
    injected = Counter()
    # Record 0: question; 1: an option; 2: the answer text; 3: everything at once; 4, 5: untouched.
    dirty[0]["question"] = _inject(clean[0]["question"], CONTROLS)
    injected[0] = len(CONTROLS)
    opt = clean[1]["answer_idx"]
    dirty[1]["options"][opt] = "\u202e" + clean[1]["options"][opt] + "\x00"
    dirty[1]["answer"] = "\u202e" + clean[1]["answer"] + "\x00"  # the gold text agrees with the option
    injected[1] = 2  # the record's answer text is only compared with the option: not in the row
    dirty[2]["answer"] = clean[2]["answer"] + "\x1b"  # still agrees with its option once cleaned
    dirty[3]["question"] = _inject(clean[3]["question"], ["\x1b", "\u2067"])
    for k in dirty[3]["options"]:
        dirty[3]["options"][k] = "\x00" + clean[3]["options"][k]
    injected[3] = 2 + len(clean[3]["options"])
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clean))
    (tmp_path / "dirty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dirty))

    counts: Counter[str] = Counter()
    before = _records("medqa", tmp_path / "clean.jsonl")
    after = _records("medqa", tmp_path / "dirty.jsonl", counts=counts)
    assert [k for k, _ in after] == ["question"] * 6
    for i, ((_, a), (_, b)) in enumerate(zip(before, after, strict=True)):
        # The same question, the same id: the characters are gone, nothing else changed.
        for field in ("question_id", "question", "options", "answer", "answer_text"):
            assert a[field] == b[field], (i, field)
        meta = json.loads(b["metadata"] or "{}")
        assert meta.get("control_chars_removed", 0) == injected[i], i
        assert {k: v for k, v in meta.items() if k != "control_chars_removed"} == json.loads(
            a["metadata"] or "{}"
        )
        text = (
            b["question"] + b["answer"] + (b["answer_text"] or "") + "".join(o["text"] for o in b["options"])
        )
        assert not LEFT_ALONE.search(text)
    assert counts == {"control_chars_removed": sum(injected.values()), "records_with_control_chars": 3}
    # Untouched records: the very same rows as before.
    assert after[4] == (before[4][0], {**before[4][1], "input_file": after[4][1]["input_file"]})

    # Ingested: no control character in any text of the output.
    result = ingest("medqa", str(tmp_path / "dirty.jsonl"), str(tmp_path / "out"))
    assert result.questions == 6
    rows = storage.Dataset(result.questions_uri, QUESTION_SCHEMA).read_all().to_pylist()
    for row in rows:
        texts = [row["question"], row["answer"], row["answer_text"] or ""] + [
            o["text"] for o in row["options"]
        ]
        assert not any(LEFT_ALONE.search(t) for t in texts)
    assert sum(json.loads(r["metadata"]).get("control_chars_removed", 0) for r in rows) == sum(
        injected.values()
    )


def test_newlines_tabs_and_crlf_stay(shared_data):
    rec = _medqa_lines(shared_data, 1)[0]
    question = rec["question"].replace(". ", ".\n", 1).replace(" ", "\t", 1) + "\r\nLast line."
    row = question_row(
        source="medqa",
        split="test",
        task_type="text_mcq",
        question=question,
        options=rec["options"],
        answer=rec["answer_idx"],
        input_file="x",
        record_index=0,
    )
    assert row["question"] == question and row["metadata"] is None
    assert strip_controls("a\rb\r\nc\td\ne") == "ab\r\nc\td\ne"
    tally: list[int] = []
    assert strip_controls("\u202eevil\x00", tally) == "evil" and tally == [2]


def test_metadata_texts_are_stripped_too(shared_data, tmp_path):
    rec = _medqa_lines(shared_data, 1)[0]
    (tmp_path / "m.jsonl").write_text(json.dumps(dict(rec, meta_info="step\x1b[2J1\u202e")) + "\n")
    [(kind, row)] = _records("medqa", tmp_path / "m.jsonl")
    assert kind == "question" and json.loads(row["metadata"])["meta_info"] == "step[2J1"


def test_a_text_of_only_controls_is_empty(shared_data, tmp_path):
    rec = _medqa_lines(shared_data, 1)[0]
    (tmp_path / "x.jsonl").write_text(json.dumps(dict(rec, question="\x00\u202e\x1b")) + "\n")
    [(kind, row)] = _records("medqa", tmp_path / "x.jsonl")
    assert kind == "quarantine" and row["reason"] == "missing_question"


# --- compressed inputs ---------------------------------------------------------------------------


def _gzip(src: Path, dst: Path) -> Path:
    dst.write_bytes(gzip.compress(src.read_bytes()))
    return dst


def _same(plain: list, packed: list, plain_file: Path, packed_file: Path) -> None:
    assert len(plain) == len(packed) and plain
    for (k1, a), (k2, b) in zip(plain, packed, strict=True):
        assert k1 == k2
        assert {k: v for k, v in a.items() if k != "input_file"} == {
            k: v for k, v in b.items() if k != "input_file"
        }
    assert {r["input_file"] for _, r in plain} == {str(plain_file)}
    assert {r["input_file"] for _, r in packed} == {str(packed_file)}


@pytest.mark.parametrize(
    ("fmt", "rel"),
    [
        ("medqa", MEDQA),  # JSON Lines
        ("mmlu_pro", "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json"),  # one JSON array, streamed
        ("mmlu", "mmlu_medical/anatomy_test.csv"),  # CSV
        ("slake", "slake/test_close.csv"),  # the loader picks CSV or JSON by the suffix under .gz
    ],
)
def test_gzipped_inputs_read_like_the_plain_file(shared_data, tmp_path, fmt, rel):
    plain = shared_data / rel
    packed = _gzip(plain, tmp_path / (plain.name + ".gz"))
    _same(_records(fmt, plain), _records(fmt, packed), plain, packed)


def test_a_folder_of_gzipped_csvs_reads_like_the_folder(shared_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted((shared_data / "mmlu_medical").glob("*.csv")):
        _gzip(f, src / (f.name + ".gz"))
    plain = _records("mmlu", shared_data / "mmlu_medical")
    packed = _records("mmlu", src)
    assert [r["question_id"] for _, r in plain] == [r["question_id"] for _, r in packed]
    result = ingest("mmlu", str(src), str(tmp_path / "out"))
    expected = ingest("mmlu", str(shared_data / "mmlu_medical"), str(tmp_path / "plain_out"))
    assert result.records == len(plain) == expected.records
    assert (result.questions, result.reasons) == (expected.questions, expected.reasons)


def test_broken_gzip_and_gzip_bombs_name_the_file(shared_data, tmp_path, monkeypatch):
    fake = tmp_path / "plain_text.jsonl.gz"
    shutil.copy(shared_data / MEDQA, fake)  # not gzip at all
    with pytest.raises(SourceError, match=re.escape(str(fake)) + ".*not a readable gzip file"):
        _records("medqa", fake)
    whole = gzip.compress((shared_data / MEDQA).read_bytes())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])  # ends before the end-of-stream marker
    with pytest.raises(SourceError, match=re.escape(str(cut))):
        _records("medqa", cut)
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(whole)
    monkeypatch.setattr(source_paths, "MAX_DECOMPRESSED", 100_000)
    with pytest.raises(SourceError, match=re.escape(str(bomb)) + ".*more than 100000 bytes"):
        _records("medqa", bomb)


def _archives(src: Path, folder: Path) -> list[Path]:
    data = src.read_bytes()
    made = []
    z = folder / "medqa.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../../escape/" + src.name, data)  # a member path that would escape: never read
    made.append(z)
    for name, mode in (("medqa.tar.gz", "w:gz"), ("medqa.tgz", "w:gz")):
        with tarfile.open(folder / name, mode) as tf:
            info = tarfile.TarInfo(src.name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        made.append(folder / name)
    (folder / "medqa.jsonl.bz2").write_bytes(bz2.compress(data))
    (folder / "medqa.jsonl.xz").write_bytes(lzma.compress(data))
    return made + [folder / "medqa.jsonl.bz2", folder / "medqa.jsonl.xz"]


def test_archives_are_refused_in_one_line_naming_the_file(shared_data, tmp_path):
    for archive in _archives(shared_data / MEDQA, tmp_path):
        with pytest.raises(SourceError) as err:
            iter_records("medqa", str(archive))  # refused when called, before any record is read
        message = str(err.value)
        assert str(archive) in message and "compressed_archive_unsupported" in message
        assert "\n" not in message
        with pytest.raises(OctomedError, match=re.escape(str(archive))):
            ingest("medqa", str(archive), str(tmp_path / "out"))
    assert not (tmp_path.parent / "escape").exists()
    # A folder holding only archives says so.
    with pytest.raises(SourceError, match=r"archives are not read.*medqa\.zip"):
        _records("medqa", tmp_path)


# --- damaged files name themselves -----------------------------------------------------------------


def _medqa_parquet(shared_data: Path, path: Path) -> None:
    """200 real MedQA records as a Parquet file in the hub's layout (4 row groups, uncompressed)."""
    pq.write_table(
        pa.Table.from_pylist(_medqa_lines(shared_data, 200)), path, row_group_size=50, compression="none"
    )


MAPPING = "medqa"


def test_corrupt_parquet_names_the_file(shared_data, tmp_path):
    good = tmp_path / "good.parquet"
    _medqa_parquet(shared_data, good)
    assert sum(k == "question" for k, _ in _records("hf", good, mapping=MAPPING)) == 200

    no_magic = tmp_path / "no_magic.parquet"
    no_magic.write_bytes(b"\x00" * 16 + good.read_bytes()[16:-16])  # both magic markers gone
    with pytest.raises(SourceError, match=re.escape(str(no_magic)) + ".*not a readable Parquet file"):
        _records("hf", no_magic, mapping=MAPPING)

    # A valid footer over damaged pages: found while reading, and still named.
    blob = bytearray(good.read_bytes())
    meta = pq.ParquetFile(good).metadata
    col = meta.row_group(2).column(0)
    start = col.data_page_offset
    blob[start : start + 64] = b"\xff" * 64
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(bytes(blob))
    with pytest.raises(SourceError, match=re.escape(str(damaged))):
        _records("hf", damaged, mapping=MAPPING)

    with pytest.raises(OctomedError, match=re.escape(str(no_magic))):
        ingest("hf", str(no_magic), str(tmp_path / "out"), mapping=MAPPING)


def test_corrupt_arrow_names_the_file(tmp_path):
    bad = tmp_path / "data-00000-of-00001.arrow"
    bad.write_bytes(b"ARROW1\x00\x00not really arrow at all")
    with pytest.raises(SourceError, match=re.escape(str(bad))):
        _records("hf", bad, mapping=MAPPING)


def test_corrupt_save_to_disk_state_names_the_file(tmp_path):
    (tmp_path / "state.json").write_text('{"_data_files": [')
    with pytest.raises(SourceError, match=re.escape(str(tmp_path / "state.json")) + ".*not valid JSON"):
        _records("hf", tmp_path, mapping=MAPPING)
