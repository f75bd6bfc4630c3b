"""The decontamination index: what must be removed, what must be kept, and its saved form.

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

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageEnhance

from octomed_data.decontam import DecontamError, DecontamIndex, tokens
from octomed_data.images import fingerprint, load_image, open_raster
from octomed_data.registry import load_registry
from octomed_data.schema import QUESTION_SCHEMA
from tests.support.decontam_rows import VQA_IMAGE, image_ref, make_row, perturb, read_jsonl

# --------------------------------------------------------------------------- text rules


@pytest.mark.parametrize(
    ("benchmark", "loader"),
    [
        ("medqa", lambda d: read_jsonl(d / "medqa/phrases_no_exclude_test.jsonl")[7]),
        ("medmcqa", lambda d: read_jsonl(d / "medmcqa/dev.json")[3]),
        ("pubmedqa", lambda d: next(iter(json.loads((d / "pubmedqa/ori_pqal.json").read_text()).values()))),
        ("mmlu_medical", lambda d: next(csv.reader((d / "mmlu_medical/anatomy_test.csv").open(newline="")))),
        (
            "mmlu_pro_medical",
            lambda d: json.loads((d / "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json").read_text())[5],
        ),
        ("medxpertqa_text", lambda d: read_jsonl(d / "medxpertqa/medxpertqa_sampled_text_input.jsonl")[0]),
        ("medxpertqa_mm", lambda d: read_jsonl(d / "medxpertqa/medxpertqa_mm_input.jsonl")[0]),
        ("medbullets", lambda d: read_jsonl(d / "medreason_eval/medbullets_op5.jsonl")[3]),
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
        for i, r in enumerate(read_jsonl(shared_data / "medqa/medqa_test_5opt.jsonl"))
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
    other = image_ref(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
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
    match = index.check(make_row("Describe the findings.", images=[image_ref(original)]))
    assert match is not None and (match.kind, match.benchmark) == ("image_sha256", "vqa_rad")

    buf = io.BytesIO()
    original.convert("RGB").save(buf, "JPEG", quality=60)
    variants = {
        "reencoded": Image.open(io.BytesIO(buf.getvalue())),
        "resized": original.resize((original.width // 2, original.height // 2)),
        "brightened": ImageEnhance.Brightness(original).enhance(1.1),
    }
    for name, img in variants.items():
        match = index.check(make_row("Describe the findings.", images=[image_ref(img)]))
        assert match is not None and match.kind == "image_phash", name
        assert match.benchmark == "vqa_rad" and int(match.detail) <= 6, name
    # With threshold 0 only byte-identical normalised images count.
    assert (
        index.check(make_row("Describe.", images=[image_ref(variants["brightened"])]), phash_threshold=0)
        is None
    )


def test_different_image_of_the_same_modality_is_kept(shared_data):
    table = load_registry()
    held_out = fingerprint(open_raster(str(shared_data / VQA_IMAGE)))[1]
    # An index over every registry image but this one: the other VQA-RAD radiographs/CTs are its neighbours.
    keep = pa.compute.invert(pa.compute.fill_null(pa.compute.equal(table["image_sha256"], held_out), False))
    partial = DecontamIndex.from_registry(table.filter(keep))
    img = open_raster(str(shared_data / VQA_IMAGE))
    assert partial.check(make_row("Describe.", images=[image_ref(img)])) is None
    ct = load_image(str(shared_data / "dicom" / "pydicom" / "CT_small.dcm")).image  # a real CT slice
    assert partial.check(make_row("Describe.", images=[image_ref(ct)])) is None


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
