"""The benchmark registry decontamination matches against, and the import graph between them.

Real benchmark files (../shared/data): the registry built from them must equal the bundled pack.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from octomed_data import storage
from octomed_data.decontam import normalized_text, strip_choices
from octomed_data.registry import (
    BUNDLED_REGISTRY,
    EXPECTED_ITEMS,
    RegistryError,
    build_registry,
    load_registry,
    registry_counts,
    write_registry,
)
from octomed_data.schema import QUESTION_SCHEMA
from tests.support.decontam_rows import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def test_registry_counts_match_readme_and_bundled_pack_is_current(shared_data, tmp_path):
    table = build_registry(shared_data)
    counts = registry_counts(table)
    assert {b: c["items"] for b, c in counts.items()} == EXPECTED_ITEMS
    assert counts["vqa_rad"]["images"] == 12 and counts["omnimedvqa"]["images"] == 11
    assert sum(c["images"] for c in counts.values()) == 25  # + imaging_cls_lab (2 images)
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
    from octomed_data.stages.ingest import ingest

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


def test_normalized_text_is_what_registry_links_on(shared_data):
    # Copies differ in spacing/quotes/appended choices but link to one canonical item.
    head = read_jsonl(shared_data / "medqa/medqa_input.head200.jsonl")[0]["question"]
    canon = read_jsonl(shared_data / "medqa/phrases_no_exclude_test.jsonl")[0]["question"]
    assert normalized_text(strip_choices(head)) == normalized_text(canon)


def _decontam_modules_after(code: str) -> list[str]:
    """The ``octomed_data.decontam`` modules loaded in a fresh interpreter after running ``code``."""
    probe = (
        f"{code}; import sys; print(sorted(m for m in sys.modules if m.startswith('octomed_data.decontam')))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().replace("'", '"'))


def test_registry_uses_the_text_rules_without_the_index():
    # The registry needs only the text rules: importing it loads neither the index nor the shard driver.
    assert _decontam_modules_after("import octomed_data.registry") == [
        "octomed_data.decontam",
        "octomed_data.decontam.text",
    ]
    # No circle: either import order works, and the index is what pulls in the registry.
    assert "octomed_data.decontam.index" in _decontam_modules_after(
        "import octomed_data.registry; from octomed_data.decontam import DecontamIndex"
    )
    assert _decontam_modules_after("import octomed_data.decontam.index, octomed_data.registry") == [
        "octomed_data.decontam",
        "octomed_data.decontam.index",
        "octomed_data.decontam.text",
    ]
