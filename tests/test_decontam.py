"""Decontamination against the benchmark registry: what must be removed, what must be kept.

Real benchmark files (../shared/data) throughout; the index is the one built from the bundled
registry pack, the same one `octomed-data decontaminate` uses by default.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image, ImageEnhance

from octomed_data import cli, storage
from octomed_data.decontam import (
    DecontamError,
    DecontamIndex,
    decontaminate,
    decontaminate_shard,
    normalized_text,
    strip_choices,
    tokens,
)
from octomed_data.images import fingerprint, load_image, open_raster
from octomed_data.registry import (
    BUNDLED_REGISTRY,
    EXPECTED_ITEMS,
    RegistryError,
    build_registry,
    load_registry,
    registry_counts,
    write_registry,
)
from octomed_data.schema import QUESTION_SCHEMA, REMOVED_SCHEMA, TaskType, question_row

VQA_IMAGE = "vqa_rad/images/synpic16174.jpg"


# --------------------------------------------------------------------------- helpers


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _image_ref(img: Image.Image) -> dict:
    _, sha, ph = fingerprint(img)
    return {"sha256": sha, "uri": f"images/{sha}.png", "phash": ph, "width": img.width, "height": img.height}


def make_row(
    question: str, options: list[str] | None = None, images: list[dict] | None = None, i: int = 0
) -> dict:
    """A question row as ingest would write it (multiple choice when options are given)."""
    if images:
        task = TaskType.MM_MCQ if options else TaskType.OPEN_VQA
    else:
        task = TaskType.TEXT_MCQ if options else TaskType.OPEN_QA
    return question_row(
        source="train-set",
        split="train",
        task_type=task,
        question=question,
        options={chr(65 + k): o for k, o in enumerate(options or [])},
        answer="A" if options else "some answer",
        images=images or (),
        input_file="train.jsonl",
        record_index=i,
    )


def perturb(text: str, every: int = 10, word: str = "blue") -> str:
    """Replace every ``every``-th token with a real (in-vocabulary) word: no 16-token run survives."""
    toks = tokens(text)
    return " ".join(word if k % every == every - 1 else t for k, t in enumerate(toks))


@pytest.fixture(scope="module")
def index() -> DecontamIndex:
    return DecontamIndex.from_registry()


@pytest.fixture(scope="module")
def medqa(shared_data) -> list[dict]:
    return _jsonl(shared_data / "medqa" / "phrases_no_exclude_test.jsonl")


# --------------------------------------------------------------------------- registry


def test_registry_counts_match_readme_and_bundled_pack_is_current(shared_data, tmp_path):
    table = build_registry(shared_data)
    counts = registry_counts(table)
    assert {b: c["items"] for b, c in counts.items()} == EXPECTED_ITEMS
    assert counts["vqa_rad"]["images"] == 12 and counts["omnimedvqa"]["images"] == 11
    assert sum(c["images"] for c in counts.values()) == 23
    # Every copy linked back to a canonical item id (no "<file>#<index>" orphans).
    assert not [i for i in table.column("item_id").to_pylist() if "#" in i]
    # The copies' files are recorded on the canonical rows.
    medqa_sources = set(
        table.filter(pa.compute.equal(table["benchmark"], "medqa"))["source_file"].to_pylist()
    )
    assert medqa_sources == {
        "medqa/phrases_no_exclude_test.jsonl;medqa/medqa_test_5opt.jsonl;huatuogpt_o1_eval/MedQA_USLME_test.json"
        ";medqa/medqa_input.head200.jsonl",
        "medqa/phrases_no_exclude_test.jsonl;medqa/medqa_test_5opt.jsonl;huatuogpt_o1_eval/MedQA_USLME_test.json",
    }
    # The committed pack holds exactly what the files give today, and round-trips through a pack file.
    assert load_registry().equals(table)
    size = write_registry(table, str(tmp_path / "pack.parquet"))
    assert load_registry(str(tmp_path / "pack.parquet")).equals(table)
    assert size == BUNDLED_REGISTRY.stat().st_size < 5_000_000
    assert registry_counts(load_registry()) == counts


def test_registry_texts_follow_the_readme_fields(shared_data):
    table = load_registry()
    rows = {(r["benchmark"], r["item_id"]): r for r in table.to_pylist()}
    # MedXpertQA: the appended "Answer Choices:" block is cut off.
    text0 = rows[("medxpertqa_text", "Text-0")]["text"]
    assert "Answer Choices" not in text0 and text0.endswith("during shoulder surgery?")
    assert len(rows[("medxpertqa_text", "Text-0")]["options"]) == 10
    # PubMedQA: CONTEXTS + QUESTION; all 1000 PQA-L items (test + the other 500) are held out.
    pqal = json.loads((shared_data / "pubmedqa" / "ori_pqal.json").read_text())
    first = next(iter(pqal))
    assert rows[("pubmedqa", first)]["text"].endswith(pqal[first]["QUESTION"])
    assert pqal[first]["CONTEXTS"][0] in rows[("pubmedqa", first)]["text"]
    # MMLU: CSV column 0; PathVQA: sentf.pvqa[j]; SLAKE keeps the Chinese items.
    with (shared_data / "mmlu_medical" / "anatomy_test.csv").open(newline="") as fh:
        assert rows[("mmlu_medical", "anatomy:0")]["text"] == next(csv.reader(fh))[0]
    pvqa = json.loads((shared_data / "pathvqa" / "pvqa_test.json").read_text())
    assert rows[("pathvqa", "test_0001:1")]["text"] == pvqa[1]["sentf"]["pvqa"][1]
    assert any(r["benchmark"] == "slake" and "图片" in r["text"] for r in rows.values())
    # OmniMedVQA Med-R1: the "A)x, B)y" tail becomes options.
    r1 = rows[("omnimedvqa", "med_r1_xray:0")]
    assert r1["text"] == "What imaging technique is utilized to capture this picture?"
    assert r1["options"] == ["X-ray", "MRI", "Echocardiogram", "Mammography"]
    assert all(
        r["image_grounded"] for r in rows.values() if r["benchmark"] in ("vqa_rad", "slake", "pathvqa")
    )


def test_registry_image_hashes_equal_what_ingest_stores(shared_data, tmp_path):
    from octomed_data.ingest import ingest

    out = str(tmp_path / "vqa")
    ingest(
        "vqa_rad",
        str(shared_data / "vqa_rad" / "testset.json"),
        out,
        images=str(shared_data / "vqa_rad" / "images"),
    )
    ingested = storage.Dataset(storage.join(out, "questions"), QUESTION_SCHEMA).read_all().to_pylist()
    table = load_registry()
    registry_images = {
        s: p
        for s, p in zip(table["image_sha256"].to_pylist(), table["image_phash"].to_pylist(), strict=True)
        if s is not None
    }
    stored = {im["sha256"]: im["phash"] for row in ingested for im in row["images"]}
    assert len(stored) == 12
    assert all(registry_images.get(sha) == ph for sha, ph in stored.items())


def test_registry_errors_are_one_line(tmp_path):
    with pytest.raises(RegistryError, match="benchmark files missing"):
        build_registry(tmp_path)
    with pytest.raises(RegistryError, match="registry pack not found"):
        load_registry(str(tmp_path / "nope.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(RegistryError, match="not a registry pack"):
        load_registry(str(tmp_path / "bad.parquet"))


# --------------------------------------------------------------------------- text rules


def test_normalisation():
    assert tokens("Don’t  “STOP” — the 67-year-old's\tX-ray!") == tokens(
        'don\'t "stop" - the 67 year old s x ray'
    )
    assert tokens("Ｆｕｌｌｗｉｄｔｈ ﬁne") == ["fullwidth", "fine"]
    assert tokens("这张图片 is CT") == ["这", "张", "图", "片", "is", "ct"]
    assert tokens("snake_case") == ["snake", "case"]
    q = "Which is it?\nAnswer Choices: (A) one (B) two"
    assert strip_choices(q) == "Which is it?"
    assert strip_choices("What is shown? A)X-ray, B)MRI, C)CT") == "What is shown?"
    assert strip_choices("Vitamin A) deficiency causes what?") == "Vitamin A) deficiency causes what?"


@pytest.mark.parametrize(
    ("benchmark", "loader"),
    [
        ("medqa", lambda d: _jsonl(d / "medqa/phrases_no_exclude_test.jsonl")[7]),
        ("medmcqa", lambda d: _jsonl(d / "medmcqa/dev.json")[3]),
        ("pubmedqa", lambda d: next(iter(json.loads((d / "pubmedqa/ori_pqal.json").read_text()).values()))),
        ("mmlu_medical", lambda d: next(csv.reader((d / "mmlu_medical/anatomy_test.csv").open(newline="")))),
        (
            "mmlu_pro_medical",
            lambda d: json.loads((d / "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json").read_text())[5],
        ),
        ("medxpertqa_text", lambda d: _jsonl(d / "medxpertqa/medxpertqa_sampled_text_input.jsonl")[0]),
        ("medxpertqa_mm", lambda d: _jsonl(d / "medxpertqa/medxpertqa_mm_input.jsonl")[0]),
        ("medbullets", lambda d: _jsonl(d / "medreason_eval/medbullets_op5.jsonl")[3]),
        ("pathvqa", lambda d: json.loads((d / "pathvqa/pvqa_test.json").read_text())[1]),
    ],
)
def test_exact_benchmark_question_is_removed(index, shared_data, benchmark, loader):
    rec = loader(shared_data)
    if isinstance(rec, list):  # MMLU CSV row
        question, options = rec[0], rec[1:5]
    elif "QUESTION" in rec:  # PubMedQA, laid out as ingest lays it out (context, then question)
        question, options = (
            "Context:\n" + "\n".join(rec["CONTEXTS"]) + "\n\nQuestion: " + rec["QUESTION"],
            None,
        )
    elif "opa" in rec:  # MedMCQA dev
        question, options = rec["question"], [rec[k] for k in ("opa", "opb", "opc", "opd")]
    elif "sentf" in rec:
        question, options = rec["sentf"]["pvqa"][0], None
    else:
        question = rec["question"]
        raw = rec.get("options") or []
        options = list(raw.values()) if isinstance(raw, dict) else [o["content"] for o in raw]
    match = index.check(make_row(question, options))
    assert match is not None and match.benchmark == benchmark
    assert match.kind in ("text_ngram", "text_exact")


def test_case_punctuation_quote_whitespace_variants_are_removed(index, medqa):
    q = medqa[0]["question"]
    variants = [
        q.upper(),
        q.replace("'", "’").replace(",", " ,  ").replace(" ", "\n  "),
        '"' + q.replace(".", " ... ") + '"',
        q.replace("-", "—").replace(" the ", " The "),
        "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in q),  # full-width letters
    ]
    for v in variants:
        match = index.check(make_row(v, ["x", "y"]))
        assert match is not None and (match.benchmark, match.item_id, match.kind) == (
            "medqa",
            "test-00000",
            "text_ngram",
        )


def test_benchmark_question_embedded_in_longer_text_is_removed(index, medqa):
    inner = tokens(medqa[42]["question"])[20:40]
    text = "Background for a new case in our curriculum. " + " ".join(inner) + " Explain your reasoning."
    match = index.check(make_row(text))
    assert match is not None and match.item_id == "test-00042"
    assert match.detail == " ".join(inner[:16])


def test_medqa_5_option_copy_is_removed_entirely(index, shared_data):
    rows = [
        make_row(r["question"], list(r["options"].values()), i=i)
        for i, r in enumerate(_jsonl(shared_data / "medqa/medqa_test_5opt.jsonl"))
    ]
    matches = index.check_table(pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA))
    assert all(m is not None for m in matches)
    # Attribution goes to the item sharing the most 16-grams. A few MedQA vignettes are near-copies
    # of another MedQA or a MedBullets item (both held out), which then owns most shared n-grams.
    own = sum(m.item_id == f"test-{i:05d}" for i, m in enumerate(matches))
    assert own >= len(rows) - 8
    assert {m.benchmark for m in matches} == {"medqa", "medbullets"}
    # The one short MedQA item (11 tokens) matched through its stem + shared options.
    assert sum(m.kind == "text_exact" for m in matches) == 1


def test_near_misses_are_kept(index, medqa):
    rng = random.Random(7)
    for rec in medqa[:200]:
        words = tokens(rec["question"])
        rng.shuffle(words)  # same vocabulary, other order
        assert index.check(make_row(" ".join(words))) is None
        # One word changed every 10 tokens: no 16-token run survives.
        assert index.check(make_row(perturb(rec["question"]))) is None
    words = tokens(medqa[3]["question"])
    assert len(words) > 40
    novel = "in our ward last winter"
    assert index.check(make_row(f"{novel} {' '.join(words[:15])} {novel}")) is None  # 15-token overlap
    assert index.check(make_row(f"{novel} {' '.join(words[:16])} {novel}")) is not None  # 16 tokens do match


def test_short_items_need_whole_item_equality(index, shared_data):
    # A generic stem that several benchmark items share, with other options: kept.
    generic = make_row("Which of the following is true?", ["Aspirin is an opioid", "Insulin lowers glucose"])
    assert index.check(generic) is None
    # The real MedMCQA item (options shuffled, a fifth added): removed.
    opts = [
        "Central scotoma is seen in open angle glaucoma",
        "Topiramate can cause bilateral angle closure glaucoma",
        "Latanoprost is used with caution in patients of bronchial asthma",
        "Methazolamide causes decrease in ocular blood flow",
        "None of the above",
    ]
    match = index.check(make_row("Which of the following is TRUE?", opts))
    assert match is not None and (match.kind, match.item_id) == (
        "text_exact",
        "c02f03a6-ff92-4236-9883-f9e7bf1e02df",
    )
    # Containing a short item is not matching it.
    assert index.check(make_row("Which of the following is true? Explain why with an example.", opts)) is None


def test_short_generic_vqa_questions(index, shared_data):
    other = _image_ref(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    fracture = make_row("Is there a fracture?", images=[other])
    aneurysm = make_row("Is there evidence of an aortic aneurysm?", images=[other])  # a VQA-RAD test question
    template = make_row(
        "What modality is used to take this image?", images=[other]
    )  # SLAKE + OmniMedVQA template
    # Default "item" rule: a short VQA template on another image is not the test item.
    assert [index.check(r) for r in (fracture, aneurysm, template)] == [None, None, None]
    # Literal "text" rule: equal short text is removed, a different short question still kept.
    strict = DecontamIndex.from_registry(short_match="text")
    assert strict.check(fracture) is None
    assert strict.check(aneurysm).kind == "text_exact"
    assert strict.check(template).benchmark in ("omnimedvqa", "slake")  # a template both use


# --------------------------------------------------------------------------- image rules


def test_image_exact_and_near_duplicates_are_removed(index, shared_data):
    original = open_raster(str(shared_data / VQA_IMAGE))
    match = index.check(make_row("Describe the findings.", images=[_image_ref(original)]))
    assert match is not None and (match.kind, match.benchmark) == ("image_sha256", "vqa_rad")

    buf = io.BytesIO()
    original.convert("RGB").save(buf, "JPEG", quality=60)
    variants = {
        "reencoded": Image.open(io.BytesIO(buf.getvalue())),
        "resized": original.resize((original.width // 2, original.height // 2)),
        "brightened": ImageEnhance.Brightness(original).enhance(1.1),
    }
    for name, img in variants.items():
        match = index.check(make_row("Describe the findings.", images=[_image_ref(img)]))
        assert match is not None and match.kind == "image_phash", name
        assert match.benchmark == "vqa_rad" and int(match.detail) <= 6, name
    # With threshold 0 only byte-identical normalised images count.
    assert (
        index.check(make_row("Describe.", images=[_image_ref(variants["brightened"])]), phash_threshold=0)
        is None
    )


def test_different_image_of_the_same_modality_is_kept(shared_data):
    table = load_registry()
    held_out = fingerprint(open_raster(str(shared_data / VQA_IMAGE)))[1]
    # An index over every registry image but this one: the other VQA-RAD radiographs/CTs are its neighbours.
    keep = pa.compute.invert(pa.compute.fill_null(pa.compute.equal(table["image_sha256"], held_out), False))
    partial = DecontamIndex.from_registry(table.filter(keep))
    img = open_raster(str(shared_data / VQA_IMAGE))
    assert partial.check(make_row("Describe.", images=[_image_ref(img)])) is None
    ct = load_image(str(shared_data / "dicom" / "pydicom" / "CT_small.dcm")).image  # a real CT slice
    assert partial.check(make_row("Describe.", images=[_image_ref(ct)])) is None


# --------------------------------------------------------------------------- the index


def test_index_round_trips_locally_and_on_s3(index, medqa, tmp_path, s3_bucket):
    rows = [make_row(medqa[i]["question"], i=i) for i in range(5)] + [make_row(perturb(medqa[9]["question"]))]
    table = pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA)
    expected = index.check_table(table)
    for uri in (str(tmp_path / "index.npz"), f"{s3_bucket}/indexes/decontam.npz"):
        index.save(uri)
        loaded = DecontamIndex.load(uri)
        assert loaded.check_table(table) == expected
        assert np.array_equal(loaded.ngram_hashes, index.ngram_hashes)
        assert np.array_equal(loaded.exact_option_keys, index.exact_option_keys)
        assert loaded.item_ids == index.item_ids and loaded.vocab_tokens == index.vocab_tokens
    assert len(index.to_bytes()) < 20_000_000 and index.nbytes() < 100_000_000
    with pytest.raises(DecontamError, match="not found"):
        DecontamIndex.load(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DecontamError, match="not a decontamination index"):
        DecontamIndex.load(str(tmp_path / "junk.npz"))


def test_index_hashes_are_stable_across_processes(index):
    code = (
        "import hashlib; from octomed_data.decontam import DecontamIndex; i = DecontamIndex.from_registry(); "
        "print(hashlib.sha256(i.ngram_hashes.tobytes() + i.exact_hashes.tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert (
        out.stdout.strip()
        == hashlib.sha256(index.ngram_hashes.tobytes() + index.exact_hashes.tobytes()).hexdigest()
    )


# --------------------------------------------------------------------------- datasets and CLI


def _write_mixed_questions(uri: str, medqa: list[dict]) -> tuple[set[str], set[str]]:
    """Three shards: exact benchmark copies interleaved with perturbed (clean) versions."""
    ds = storage.Dataset(uri, QUESTION_SCHEMA)
    dirty, clean = set(), set()
    for shard in range(3):
        rows = []
        for k in range(shard * 40, shard * 40 + 40):
            rec = medqa[k]
            if k % 4 == 0:
                row = make_row(rec["question"], list(rec["options"].values()), i=k)
                dirty.add(row["question_id"])
            else:
                row = make_row(perturb(rec["question"]), list(rec["options"].values()), i=k)
                clean.add(row["question_id"])
            rows.append(row)
        ds.write_shard(shard, rows)
    return dirty, clean


def test_decontaminate_keeps_plus_removed_equals_input(index, medqa, tmp_path):
    src = str(tmp_path / "ingest" / "questions")
    dirty, clean = _write_mixed_questions(src, medqa)
    out = str(tmp_path / "dc")
    result = decontaminate(str(tmp_path / "ingest"), out, index=index)  # an ingest root works too
    assert (result.input, result.kept, result.removed) == (120, len(clean), len(dirty))
    assert result.by_benchmark == {"medqa": 30} and result.by_kind == {"text_ngram": 30}
    kept = storage.Dataset(result.kept_uri, QUESTION_SCHEMA)
    removed = storage.Dataset(result.removed_uri, REMOVED_SCHEMA)
    assert list(kept.manifest()) == list(removed.manifest()) == ["00000", "00001", "00002"]
    assert set(kept.read_all()["question_id"].to_pylist()) == clean
    removed_rows = removed.read_all().to_pylist()
    assert {r["question_id"] for r in removed_rows} == dirty
    assert all(r["match_benchmark"] == "medqa" and r["match_item"].startswith("test-") for r in removed_rows)
    assert pads.dataset(kept.files(), format="parquet").count_rows() == len(clean)
    assert storage.read_json(storage.join(out, "decontam.json"))["removed"] == 30
    # Re-running replaces shards: nothing duplicated.
    again = decontaminate(src, out, index=index)
    assert (again.kept, again.removed) == (result.kept, result.removed)
    assert kept.num_rows() + removed.num_rows() == 120
    # An input shard that disappeared (re-ingest wrote fewer) takes its outputs with it.
    storage.Dataset(src, QUESTION_SCHEMA).delete_shard("00002")
    third = decontaminate(src, out, index=index)
    assert third.input == 80 and list(kept.manifest()) == list(removed.manifest()) == ["00000", "00001"]
    assert kept.num_rows() + removed.num_rows() == 80


def test_decontaminate_shard_on_s3(index, medqa, s3_bucket):
    src = f"{s3_bucket}/run/questions"
    dirty, clean = _write_mixed_questions(src, medqa)
    loaded = DecontamIndex.load(index.save(f"{s3_bucket}/run/index.npz"))
    counts = decontaminate_shard(loaded, src, "00001", f"{s3_bucket}/run/dc")
    assert counts["input"] == 40 and counts["kept"] + counts["removed"] == 40 and counts["removed"] == 10
    assert storage.Dataset(f"{s3_bucket}/run/dc/removed", REMOVED_SCHEMA).num_rows() == 10


def test_cli_end_to_end(medqa, tmp_path, capsys):
    src = str(tmp_path / "q")
    _write_mixed_questions(src, medqa)
    idx = str(tmp_path / "index.npz")
    assert cli.main(["registry", "index", "--out", idx]) == 0
    out = str(tmp_path / "out")
    assert cli.main(["decontaminate", src, "--out", out, "--index", idx, "-q"]) == 0
    printed = capsys.readouterr().out
    assert "questions: 120  kept: 90  removed: 30" in printed
    assert "removed for medqa: 30" in printed and f"removed -> {out}/removed" in printed
    assert cli.main(["registry", "show"]) == 0
    shown = capsys.readouterr().out
    assert "pathvqa" in shown and "6761" in shown and "25659" in shown
    # User errors: one line, exit 2.
    assert cli.main(["decontaminate", str(tmp_path / "nowhere"), "--out", out, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no committed question shards") and err.count("\n") == 1
    assert (
        cli.main(["decontaminate", src, "--out", out, "--registry", str(tmp_path / "x.parquet"), "-q"]) == 2
    )
    assert "registry pack not found" in capsys.readouterr().err


def test_normalized_text_is_what_registry_links_on(shared_data):
    # Copies differ in spacing/quotes/appended choices but link to one canonical item.
    head = _jsonl(shared_data / "medqa/medqa_input.head200.jsonl")[0]["question"]
    canon = _jsonl(shared_data / "medqa/phrases_no_exclude_test.jsonl")[0]["question"]
    assert normalized_text(strip_choices(head)) == normalized_text(canon)
