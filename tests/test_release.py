"""Release: a real run (bundled sources + a PMC-VQA CSV over real DICOM files whose extra columns
carry the DICOM headers' patient fields, decontaminated against the bundled registry, distilled by
the sandbox teacher on loopback with a canary API key, filtered) published to the loopback S3
server and read back with ``datasets.load_dataset``."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from cli import main
from octomed_data import storage
from octomed_data.decontam.index import DecontamIndex
from octomed_data.errors import ConfigError
from octomed_data.images import ImageStore
from octomed_data.layout import RunPaths
from octomed_data.recipe import load_recipe
from octomed_data.release import load_release, release
from octomed_data.release_safety import image_metadata_chunks, is_patient_key
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, VERDICT_SCHEMA
from tests.support.release import SAMPLES, build_run

CANARY = "sk-canary-release-7d3f0a9c41e2b658"
DICOM_FIELDS = ("PatientName", "PatientID", "InstitutionName", "StudyInstanceUID")
TAG_KEY = "(0010,0010)"
RELEASE_DATA = Path(__file__).parent / "release_data"  # third-party images; sources in its README


def card_table(body: str, header_start: str) -> dict[str, dict[str, str]]:
    """The card's markdown table whose header line starts with ``header_start``, rows by source."""
    lines = body.splitlines()
    head = lines.index(next(line for line in lines if line.startswith(header_start)))
    header = [c.strip() for c in lines[head].strip("|").split("|")]
    table = {}
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        table[cells["source"]] = cells
    return table


# What a warning about the card's YAML metadata would mention (datasets logs "Ignoring part of
# dataset_info from the dataset card: The `splits` field in YAML is malformed ...").
METADATA_WORDS = ("card", "metadata", "dataset_info", "yaml", "malformed", "split")


def pmc_csv_over_dicom(shared_data: Path, folder: Path) -> tuple[Path, list[str]]:
    """A PMC-VQA CSV over two real DICOM files, its extra columns copied from their headers."""
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    rows, leaked = [], []
    for name, modality in (("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")):
        shutil.copy(shared_data / "dicom" / "pydicom" / name, folder / name)
        header = pydicom.dcmread(folder / name)
        fields = {k: str(header.get(k)) for k in DICOM_FIELDS}
        leaked += [v for v in fields.values() if len(v) >= 4]
        for q, text in enumerate(
            ("Which modality acquired this scan?", "What kind of scanner made this image?")
        ):
            rows.append(
                {
                    "Figure_path": name,
                    "Question": text,
                    "Answer": modality,
                    "Choice A": "A:CT",
                    "Choice B": "B:MR",
                    "Choice C": "C:Ultrasound",
                    "Choice D": "D:PET",
                    "Answer_label": "A" if modality == "CT" else "B",
                    **fields,
                    TAG_KEY: fields["PatientName"],
                    "index": str(q),
                }  # fmt: skip
            )
    path = folder / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, leaked


@pytest.fixture(scope="module")
def canary_key():
    saved = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = CANARY  # the key the teacher requests carry
    yield CANARY
    if saved is None:
        os.environ.pop("OPENAI_API_KEY", None)
    else:
        os.environ["OPENAI_API_KEY"] = saved


@pytest.fixture(scope="module")
def run(shared_data, canary_key, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release-run")
    csv_path, leaked = pmc_csv_over_dicom(shared_data, tmp / "pmc")
    entry = {"format": "pmc_vqa", "input": str(csv_path), "images": str(csv_path.parent)}
    return build_run(tmp / "store", [entry], decontam=True), leaked


def released_text(uri: str) -> str:
    """Every released file: its bytes, and for Parquet its decoded rows and every embedded image
    file's bytes (as Latin-1: a text chunk's value reads as itself)."""
    fs, root = storage.filesystem(uri)
    parts = []
    for path in fs.find(root):
        data = fs.cat_file(path)
        parts.append(data.decode("utf-8", "replace"))
        if path.endswith(".parquet"):
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
            parts.append(json.dumps(rows, default=str))
            for row in rows:
                parts += [im["bytes"].decode("latin-1") for im in row["images"] if im.get("bytes")]
    return "\n".join(parts)


def parquet_rows(uri: str) -> dict[str, int]:
    """Every Parquet file under a release folder -> its rows (read from the files themselves)."""
    fs, root = storage.filesystem(uri)
    out = {}
    for path in fs.find(root):
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as fh:
                out[path.rsplit("/", 1)[-1]] = pq.ParquetFile(fh).metadata.num_rows
    return out


@contextmanager
def metadata_warnings(caplog):
    """What ``datasets`` says about metadata while loading: its warnings and its log records
    (``datasets`` logs through its own logger; the capture is attached to it directly)."""
    said: list[str] = []
    logger = logging.getLogger("datasets")
    logger.addHandler(caplog.handler)
    caplog.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield said
    finally:
        logger.removeHandler(caplog.handler)
    messages = [str(w.message) for w in caught] + [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    ]
    said += [m for m in messages if any(word in m.lower() for word in METADATA_WORDS)]


def card_of(uri: str) -> tuple[dict, str]:
    text = storage.read_bytes(storage.join(uri, "README.md")).decode()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def by_key(rows) -> dict[tuple[str, int], dict]:
    return {(r["question_id"], r["sample_idx"]): r for r in rows}


def test_release_to_s3_loads_back_with_the_accepted_responses(run, s3_bucket, tmp_path, caplog):
    import datasets

    paths, _ = run
    out = f"{s3_bucket}/releases/demo"
    assert main(["release", paths.run_id, "--store", paths.store, "--out", out]) == 0
    meta, _ = card_of(out)
    (config,) = meta["configs"]
    (files,) = config["data_files"]
    with metadata_warnings(caplog) as said:
        ds = datasets.load_dataset(
            "parquet",
            data_files={files["split"]: storage.join(out, files["path"])},  # the card's own configuration
            split="train",
            storage_options=storage.storage_options(out),
            cache_dir=str(tmp_path / "hf"),
        )
    assert said == []
    questions = storage.Dataset(paths.questions, QUESTION_SCHEMA).read_all().to_pylist()
    (split,) = meta["dataset_info"]["splits"]
    assert len(ds) == len(questions) == split["num_examples"] and split["num_bytes"] > 0
    assert sorted(ds["question_id"]) == sorted(q["question_id"] for q in questions)  # one row each
    files_rows = parquet_rows(out)
    assert files_rows and all(files_rows.values())  # no empty Parquet file
    assert sum(files_rows.values()) == len(ds)

    accepted = by_key(storage.Dataset(paths.accepted, SAMPLE_SCHEMA).read_all().to_pylist())
    released = {}
    for row in ds:
        assert row["num_accepted"] == len(row["responses"])
        for r in row["responses"]:
            released[(row["question_id"], r["sample_idx"])] = r
            assert (r["temperature"], r["top_p"], r["max_tokens"]) == (0.6, 0.95, 8192)
    assert released.keys() == accepted.keys() and accepted
    for key, r in released.items():
        want = accepted[key]
        fields = ("teacher", "model", "prompt_version", "reasoning", "response", "extracted_answer")
        assert {f: r[f] for f in fields} == {f: want[f] for f in fields}
        assert r["correct"] is True and r["reject_reason"] is None
    images = [im for row in ds for im in row["images"]]
    assert images and all(im["path"] == f"images/{im['sha256'][:2]}/{im['sha256']}.png" for im in images)
    assert load_release(out).num_rows == len(ds)


@pytest.mark.parametrize("with_images", [False, True])
def test_the_card_is_metadata_datasets_reads_without_a_warning(run, tmp_path, caplog, with_images):
    """Issue 22: the card's ``dataset_info`` split lacked ``num_bytes``, so ``datasets`` logged
    that the card's splits were malformed and ignored them. The folder now loads with the card's
    features and split size, and the same capture does see the warning on the old card."""
    import datasets

    paths, _ = run
    out = tmp_path / "folder"
    result = release(paths, str(out), with_images=with_images)
    meta, _ = card_of(str(out))
    with metadata_warnings(caplog) as said:
        ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert said == []
    (split,) = meta["dataset_info"]["splits"]
    assert len(ds) == split["num_examples"] == result.rows == ds.info.splits["train"].num_examples
    assert split["num_bytes"] == meta["dataset_info"]["dataset_size"] > 0
    assert meta["dataset_info"]["download_size"] == sum(os.path.getsize(f) for f in result.files)
    assert ds.features == datasets.Features._from_yaml_list(meta["dataset_info"]["features"])
    assert isinstance(ds.features["images"].feature, datasets.Image) is with_images
    files = parquet_rows(str(out))
    assert all(files.values()) and sorted(files) == sorted(os.path.basename(f) for f in result.files)
    # The control: the card as it was before (a split without num_bytes) is reported.
    old = tmp_path / "old"
    shutil.copytree(out, old)
    card = (old / "README.md").read_text()
    card = re.sub(
        r"dataset_info:\n(  .*\n)+",
        f"dataset_info:\n  splits:\n  - name: train\n    num_examples: {len(ds)}\n",
        card,
    )
    (old / "README.md").write_text(card)
    with metadata_warnings(caplog) as said:
        datasets.load_dataset(str(old), split="train", cache_dir=str(tmp_path / "hf-old"))
    assert said and "malformed" in said[0]


def test_shards_without_released_rows_write_no_file(run, canary_key, tmp_path):
    """Issue 22: a shard with no released row (decontamination removed all its questions, so it
    has zero accepted rows; or the release excluded every question) shipped an empty Parquet file."""
    paths, _ = run
    zero = [s for s, info in storage.Dataset(paths.accepted).manifest().items() if info.rows == 0]
    assert zero  # vqa_rad_train, medqa_test, ...: every question removed by decontamination
    result = release(paths, str(tmp_path / "out"))
    files = parquet_rows(str(tmp_path / "out"))
    assert all(files.values()) and sum(files.values()) == result.rows
    assert set(zero) <= set(result.shards_without_rows)
    assert not any(shard in name for shard in result.shards_without_rows for name in files)
    released = storage.Dataset(str(tmp_path / "out" / "data"), file_prefix="train").manifest()
    assert set(released).isdisjoint(result.shards_without_rows) and len(released) == len(files)
    # Re-released into the same folder after a registry update matches every question of one
    # shard: that shard's earlier file goes, no empty one replaces it.
    shard, info = next(iter(released.items()))
    ids = set(storage.Dataset(paths.questions).read_shard(shard).column("question_id").to_pylist())
    real = DecontamIndex.check_table
    hit = type("Match", (), {"kind": "text", "benchmark": "updated", "item_id": "x"})()

    def check_table(self, table):
        found = real(self, table)
        return [
            hit if q in ids else m
            for q, m in zip(table.column("question_id").to_pylist(), found, strict=True)
        ]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DecontamIndex, "check_table", check_table)
        again = release(paths, str(tmp_path / "out"))
    assert again.rows == result.rows - info.rows and shard in again.shards_without_rows
    assert info.file not in parquet_rows(str(tmp_path / "out")) and all(
        parquet_rows(str(tmp_path / "out")).values()
    )
    assert shard not in storage.Dataset(str(tmp_path / "out" / "data"), file_prefix="train").manifest()


def test_a_release_with_no_row_is_a_one_line_error(run, canary_key, tmp_path, capsys):
    """A run whose every question is a benchmark test item (MedQA test, distilled without
    decontamination): the release excludes them all and says so, instead of an empty dataset;
    released over an earlier release, it leaves no card claiming rows that are gone."""
    medqa = Path(__file__).parents[1] / "octomed_data" / "sample_data" / "medqa"
    entry = {"format": "medqa", "input": str(medqa / "phrases_no_exclude_test.head8.jsonl")}
    paths = build_run(tmp_path / "store", [entry], decontam=False, demo_sources=False)
    assert storage.Dataset(paths.accepted).num_rows() > 0  # accepted, yet all benchmark items
    out = tmp_path / "empty"
    release(run[0], str(out))  # an earlier release in the same folder
    assert (out / "README.md").exists() and parquet_rows(str(out))
    assert main(["release", paths.run_id, "--store", paths.store, "--out", str(out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith("release: ")]
    assert len(err) == 1, err  # one line besides the progress bar, no traceback
    assert re.match(
        rf"error: run {paths.run_id} has no question to release \(8 excluded as benchmark", err[0]
    )
    assert err[0].endswith(f"no dataset written at {out}")
    assert not parquet_rows(str(out))
    assert not (out / "README.md").exists() and not (out / "release.json").exists()


def test_all_responses_adds_the_rejected_ones_with_their_verdicts(run, tmp_path):
    paths, _ = run
    out = str(tmp_path / "all")
    result = release(paths, out, all_responses=True)
    rows = load_release(out)
    verdicts = by_key(
        v
        for v in storage.Dataset(paths.verdicts, VERDICT_SCHEMA).read_all().to_pylist()
        if v["reject_reason"] != "request_failed"
    )
    released = {(row["question_id"], r["sample_idx"]): r for row in rows for r in row["responses"]}
    assert released.keys() == verdicts.keys() and result.responses == len(verdicts)
    for key, r in released.items():
        v = verdicts[key]
        assert (r["correct"], r["reject_reason"], r["extracted_answer"]) == (
            v["correct"], v["reject_reason"], v["extracted_answer"],
        )  # fmt: skip
    rejected = [r for r in released.values() if not r["correct"]]
    assert rejected and all(r["reject_reason"] for r in rejected)
    assert sum(r["num_samples"] for r in rows) == len(verdicts)


def test_card_numbers_are_the_run_statistics(run, tmp_path):
    paths, _ = run
    out = str(tmp_path / "card")
    result = release(paths, out)
    stats = storage.read_json(paths.stats)
    meta, body = card_of(out)
    assert meta["license"] == "other" and meta["size_categories"] == ["n<1K"]
    assert "medical" in meta["tags"] and "visual-question-answering" in meta["task_categories"]
    table = card_table(body, "| source | format | licence")
    assert set(table) == set(stats["sources"]) and {"pathvqa", "pmc_vqa", "imaging"} <= set(table)
    for source, st in stats["sources"].items():
        cells = table[source]
        assert int(cells["questions"]) == st["questions"]
        assert int(cells["samples"]) == st["samples"] and int(cells["accepted"]) == st["accepted"]
        assert cells["pass rate"] == f"{100 * st['pass_rate']:.1f}%"
        assert cells[f"pass@{SAMPLES}"] == f"{100 * st[f'pass@{SAMPLES}']:.1f}%"
        assert int(cells["without accepted"]) == st["questions_without_accepted"]
        assert int(cells["released rows"]) == result.per_source[source]["rows"]
    assert table["pathvqa"]["licence"] == "mit" and table["imaging"]["licence"] == "unknown"
    assert f"| samples judged in the run | {stats['overall']['samples']} |" in body
    assert f"| accepted samples in the run | {stats['overall']['accepted']} |" in body
    removed = Counter(storage.Dataset(paths.removed).read_all().column("match_benchmark").to_pylist())
    assert removed and all(f"| {b} | " in body for b in removed)
    assert "SHA-256 `" in body and "16-gram" in body and "NOT model traces" in body  # sandbox teacher


def test_with_images_rows_decode_to_the_runs_images(run, s3_bucket, tmp_path, caplog):
    """Issue 22: ``--with-images`` ships the pixels, so a VLM trains from the release alone: each
    row's ``images`` decode to PIL images (from s3://, no card needed) equal to the run's stored ones."""
    import datasets

    paths, _ = run
    out = f"{s3_bucket}/releases/pixels"
    cmd = ["release", paths.run_id, "--store", paths.store, "--out", out, "--with-images"]
    assert main(cmd) == 0
    with metadata_warnings(caplog) as said:
        ds = datasets.load_dataset(
            "parquet",
            data_files=storage.join(out, "data/train-*.parquet"),
            split="train",
            storage_options=storage.storage_options(out),
            cache_dir=str(tmp_path / "hf"),
        )
    assert said == []
    assert ds.features["images"] == datasets.List(datasets.Image())
    questions = {q["question_id"]: q for q in storage.Dataset(paths.questions).read_all().to_pylist()}
    shown = 0
    for row in ds:
        stored = questions[row["question_id"]]["images"]
        assert [r["sha256"] for r in row["image_refs"]] == [im["sha256"] for im in stored]
        assert len(row["images"]) == len(stored)
        for pil, im in zip(row["images"], stored, strict=True):
            assert isinstance(pil, Image.Image) and pil.size == (im["width"], im["height"])
            want = Image.open(io.BytesIO(storage.read_bytes(im["uri"])))
            assert pil.mode == want.mode and np.array_equal(np.asarray(pil), np.asarray(want))
            shown += 1
    assert shown > 0 and any(q["source"] == "pmc_vqa" and q["images"] for q in questions.values())
    # The embedded files are the store's PNGs byte for byte: their hash, no metadata chunk.
    raw = pq.read_table(
        io.BytesIO(storage.read_bytes(storage.join(out, "data/train-pmc_vqa-00000.parquet")))
    ).to_pylist()
    for row in raw:
        for im, ref in zip(row["images"], row["image_refs"], strict=True):
            assert hashlib.sha256(im["bytes"]).hexdigest() == ref["sha256"]
            assert image_metadata_chunks(im["bytes"]) == []
            assert Image.open(io.BytesIO(im["bytes"])).info == {}
    meta, body = card_of(out)
    assert {"name": "images", "list": "image"} in meta["dataset_info"]["features"]
    assert f"| images included (pixels) | {shown} |" in body
    assert "Images are included" in body and "Images are not included" not in body
    summary = storage.read_json(storage.join(out, "release.json"))
    assert summary["with_images"] is True and summary["images"] == shown


def test_the_recipe_release_block_decides_with_images_unless_told(run, tmp_path, monkeypatch):
    """``release(with_images=None)`` (the CLI without the flag, the factory, the flow) follows the
    run's recipe ``release.with_images``; an explicit value wins. (``ReleaseSettings`` gains the
    field in ``recipe.py``; until then the recipe is given one here.)"""
    import octomed_data.release as rel

    paths, _ = run
    real = rel.run_recipe

    def with_images_recipe(p):
        recipe = real(p)
        return recipe.model_copy(update={"release": recipe.release.model_copy(update={"with_images": True})})

    monkeypatch.setattr(rel, "run_recipe", with_images_recipe)
    result = release(paths, str(tmp_path / "recipe"))
    assert result.with_images is True and result.images > 0
    assert release(paths, str(tmp_path / "told"), with_images=False).images == 0
    monkeypatch.setattr(rel, "run_recipe", real)
    assert release(paths, str(tmp_path / "default")).with_images is False


def test_image_metadata_is_found_in_third_party_files_and_the_store_strips_it(shared_data, tmp_path):
    """Real files with EXIF (camera JPEGs), text chunks (libpng's test PNGs) and none (PngSuite,
    VQA-RAD JPEG): the check names what each carries, and what the image store keeps of each
    (the only bytes a release ships) carries nothing."""
    expected = {
        "exif-samples-Canon_40D.jpg": ["APP1", "APP2"],  # EXIF, ICC profile
        "exif-samples-Fujifilm_FinePix_E500.jpg": ["APP1"],
        "libpng-gray-8.png": ["tEXt", "iTXt"],
        "pngsuite-basn2c08.png": [],
    }
    files = {name: RELEASE_DATA / name for name in expected}
    files["synpic16174.jpg"] = shared_data / "vqa_rad" / "images" / "synpic16174.jpg"
    expected["synpic16174.jpg"] = []  # JFIF (APP0) only
    store = ImageStore(str(tmp_path / "store"))
    for name, path in files.items():
        assert image_metadata_chunks(path.read_bytes()) == expected[name], name
        if expected[name]:
            assert Image.open(path).info.keys() - {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi"}
        image, _ = store.put(path)
        stored = storage.read_bytes(image["uri"])
        assert image_metadata_chunks(stored) == [] and Image.open(io.BytesIO(stored)).info == {}, name
    assert image_metadata_chunks(b"GIF89a....") == ["not a PNG or JPEG file"]
    png = (RELEASE_DATA / "pngsuite-basn2c08.png").read_bytes()
    assert image_metadata_chunks(png[:-20]) == ["truncated PNG"]


def test_an_image_unlike_its_hash_or_with_metadata_is_not_published(run, tmp_path):
    """What release checks of each image it ships: the stored file is the image its hash names,
    and it carries no metadata (a text-chunk PNG whose hash is right is refused too)."""
    import octomed_data.release as rel
    from octomed_data.errors import StorageError
    from octomed_data.release_safety import SecretGuard

    paths, _ = run
    ctx = type("Ctx", (), {})()
    ctx.guard = SecretGuard({})
    ctx.result = rel.ReleaseResult(uri="x", run_id="r", all_responses=False, with_images=True)
    texty = tmp_path / "gray-8.png"
    shutil.copy(RELEASE_DATA / "libpng-gray-8.png", texty)
    sha = hashlib.sha256(texty.read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match=rf"^question q: image {sha} carries metadata \(tEXt, iTXt\)"):
        rel._image_data({"sha256": sha, "uri": str(texty)}, ctx, "question q")
    stored = next(im for q in storage.Dataset(paths.questions).read_all().to_pylist() for im in q["images"])
    with pytest.raises(StorageError, match="is not the image"):
        rel._image_data({"sha256": stored["sha256"], "uri": str(texty)}, ctx, "question q")
    assert rel._image_data(stored, ctx, "question q")["bytes"] == storage.read_bytes(stored["uri"])


@pytest.mark.parametrize("with_images", [False, True])
def test_no_api_key_and_no_patient_metadata_anywhere(run, tmp_path, with_images):
    paths, leaked = run
    questions = storage.Dataset(paths.questions, QUESTION_SCHEMA).read_all().to_pylist()
    ingested = json.dumps([q["metadata"] for q in storage.Dataset(paths.ingested).read_all().to_pylist()])
    assert all(v in ingested for v in leaked)  # the run itself carries the DICOM header fields
    dicom = [q for q in questions if q["source"] == "pmc_vqa"]
    assert dicom and all(v in q["metadata"] for q in dicom for v in ("PatientName", TAG_KEY))
    out = str(tmp_path / "scan")
    result = release(paths, out, all_responses=True, with_images=with_images)
    # The DICOM files' pixels among the images (what the store made of them: PNG, no header).
    assert result.images == (sum(len(q["images"]) for q in questions) if with_images else 0)
    text = released_text(out)
    assert CANARY not in text
    for value in leaked:
        assert value not in text, value
    assert result.metadata_keys_dropped == {k: len(dicom) for k in (*DICOM_FIELDS, TAG_KEY)}
    for row in load_release(out):
        for key in json.loads(row["metadata"] or "{}"):
            assert not is_patient_key(key)


def test_a_key_inside_a_reply_stops_the_release(run, tmp_path, monkeypatch):
    """A teacher echoing its key: the shard is not committed and no card is written."""
    paths, _ = run
    reply = next(r for r in storage.Dataset(paths.accepted).read_all().to_pylist() if r["reasoning"])
    secret = reply["reasoning"][:24]
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    out = tmp_path / "leak"
    with pytest.raises(ConfigError) as err:
        release(paths, str(out))
    assert "$OPENAI_API_KEY" in str(err.value) and secret not in str(err.value)
    assert not (out / "README.md").exists()


def test_released_questions_are_no_benchmark_items(run, canary_key, tmp_path):
    """The release-time check: a run distilled WITHOUT decontamination (the bundled sources hold
    MedQA, MedMCQA, MMLU and OmniMedVQA test items, and VQA-RAD test images) releases no registry
    item: it leaves out exactly what the decontaminate stage removed from the same sources."""
    dirty = build_run(tmp_path / "store", [], decontam=False)
    index = DecontamIndex.from_registry()
    for paths, out in ((run[0], tmp_path / "clean"), (dirty, tmp_path / "dirty")):
        result = release(paths, str(out))
        rows = list(load_release(str(out)))
        table = storage.Dataset(paths.questions, QUESTION_SCHEMA).read_all()
        kept = {r["question_id"] for r in rows}
        released = table.filter(pa.array([q in kept for q in table.column("question_id").to_pylist()]))
        assert released.num_rows == len(rows) > 0
        assert all(m is None for m in index.check_table(released))  # checked against the registry
    # The clean run's extra PMC-VQA entry is not in the dirty run: compare the sources both have.
    sources = set(storage.Dataset(dirty.ingested).read_all(["source"]).column(0).to_pylist())
    removed = [r for r in storage.Dataset(run[0].removed).read_all().to_pylist() if r["source"] in sources]
    assert {e["question_id"] for e in result.excluded} == {r["question_id"] for r in removed}
    assert Counter(e["benchmark"] for e in result.excluded) == Counter(r["match_benchmark"] for r in removed)
    assert {"medqa", "medmcqa", "mmlu_medical", "omnimedvqa", "vqa_rad"} <= {
        e["benchmark"] for e in result.excluded
    }
    assert storage.read_json(str(tmp_path / "dirty" / "release.json"))["excluded"] == result.excluded
    _, body = card_of(str(tmp_path / "dirty"))
    assert f"excluded {len(removed)}." in body and "stage was OFF" in body
    # Shards whose every question is a benchmark item (MedQA test ...) write no file.
    files = parquet_rows(str(tmp_path / "dirty"))
    assert all(files.values()) and "medqa_test-00000" in result.shards_without_rows
    assert not any("medqa_test" in name for name in files)


def test_large_shards_are_grouped_in_buckets_with_the_same_result(run, tmp_path, monkeypatch):
    import octomed_data.release as rel

    paths, _ = run
    release(paths, str(tmp_path / "one"), all_responses=True)
    monkeypatch.setattr(rel, "BUCKET_BYTES", 1024)  # every reply shard spills into several buckets
    release(paths, str(tmp_path / "many"), all_responses=True)
    one = {r["question_id"]: r for r in load_release(str(tmp_path / "one"))}
    many = {r["question_id"]: r for r in load_release(str(tmp_path / "many"))}
    assert one == many and len(one) > 0


def test_unfiltered_run_and_bad_recipe_block_are_one_line_errors(run, tmp_path, capsys):
    paths, _ = run
    copy = tmp_path / "store"
    shutil.copytree(Path(paths.root).parent.parent, copy)
    copied = RunPaths(str(copy), paths.run_id)
    shard = next(iter(storage.Dataset(copied.verdicts).manifest()))
    os.remove(storage.Dataset(copied.verdicts).marker_uri(shard))
    assert main(["release", paths.run_id, "--store", str(copy), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"error: run {paths.run_id} is not filtered .*{shard}", err[0])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match=r"release\.out is required"):
        load_recipe("demo", overrides={"release": {"enabled": True}})
    assert load_recipe("demo", overrides={"release": {"enabled": True, "out": "s3://b/r"}}).release.out


def test_a_run_filtered_with_its_own_verifier_settings_is_released(canary_key, tmp_path):
    """Review finding: release checked the verdicts against the default verifier settings, so a run
    filtered with a ``verify:`` block could never be released ("not filtered")."""
    paths = build_run(
        tmp_path / "store",
        [],
        decontam=False,
        verify={"sources": {"pathvqa": "normalized"}, "synonyms": [["carcinoma", "cancer"]]},
    )
    result = release(paths, str(tmp_path / "out"))
    assert result.rows > 0


def test_a_judge_verified_release_carries_the_verifier_and_the_calibration(canary_key, tmp_path):
    """Issue 21: a release of a judge-verified run lost ``verifier``, ``verifier_rule`` and
    ``judge_correct``, and its card showed no calibration, so judge-accepted answers looked like
    exact matches. The sandbox judge errs on 30% of its keys here, so it accepts some wrong answers."""
    verify = {"sources": {"pathvqa": "judge", "vqa_rad": "judge"}, "calibration_samples": 20}
    paths = build_run(
        tmp_path / "store", [], decontam=False, verify=verify, faults={"judge_error": 0.3, "seed": 4}
    )
    out = str(tmp_path / "out")
    result = release(paths, out, all_responses=True)
    verdicts = by_key(storage.Dataset(paths.verdicts, VERDICT_SCHEMA).read_all().to_pylist())
    rows = list(load_release(out))
    released = {(row["question_id"], r["sample_idx"]): r for row in rows for r in row["responses"]}
    assert released and result.responses == len(released)
    fields = ("correct", "verifier", "verifier_rule", "judge_correct")
    for key, r in released.items():
        assert {f: r[f] for f in fields} == {f: verdicts[key][f] for f in fields}
        if r["correct"]:
            assert r["verifier"] in ("exact", "normalized", "judge") and r["verifier_rule"]
    by_judge = [r for r in released.values() if r["correct"] and r["verifier"] == "judge"]
    assert by_judge and all(r["judge_correct"] is True and r["verifier_rule"] == "judge" for r in by_judge)
    calibrated = [r for r in released.values() if r["verifier"] == "exact" and r["judge_correct"] is not None]
    assert calibrated  # closed replies the judge was asked about, their verdict still exact match's
    # The accepted-only release carries them too (from the accepted rows' verdicts).
    accepted_only = str(tmp_path / "accepted")
    release(paths, accepted_only)
    for row in load_release(accepted_only):
        for r in row["responses"]:
            key = (row["question_id"], r["sample_idx"])
            assert {f: r[f] for f in fields} == {f: verdicts[key][f] for f in fields}
    # release.json and the card: the settings and the judge's calibration per source, false-accept
    # rate included (fp / (fp + tn): of the wrong closed replies, the share the judge accepted).
    stats = storage.read_json(paths.stats)
    calibration = stats["verifier"]["calibration"]
    summary = storage.read_json(str(tmp_path / "out" / "release.json"))
    assert summary["verifier"]["calibration"] == calibration
    assert summary["verifier"]["settings"]["sources"]["pathvqa"]["mode"] == "judge"
    for source, c in calibration.items():
        wrong = c["fp"] + c["tn"]
        assert c["false_accept_rate"] == (round(c["fp"] / wrong, 4) if wrong else None), source
    assert calibration["overall"]["fp"] > 0  # the judge did accept wrong answers
    _, body = card_of(out)
    table = card_table(body, "| source | judged | precision")
    assert "false-accept rate" in next(iter(table.values()))
    assert set(table) == set(calibration) and "overall" in table
    for source, c in calibration.items():
        far = c["false_accept_rate"]
        assert table[source]["false-accept rate"] == ("–" if far is None else f"{100 * far:.1f}%")
        assert int(table[source]["judged"]) == c["judged"] and int(table[source]["fp"]) == c["fp"]
    assert "## Verification" in body and "sandbox-not-a-model" in body
    by_source = Counter(
        row["source"] for row in rows for r in row["responses"] if r["correct"] and r["verifier"] == "judge"
    )
    for source, n in by_source.items():
        assert result.per_source[source]["accepted_by_judge"] == n
    assert f"{len(by_judge)} accepted response(s) were accepted by the LLM judge" in body


def test_release_stage_is_done_until_its_inputs_or_settings_change(run, tmp_path):
    """The release is a global step with a done marker in the run (never in OUT, whose every Parquet
    file is release rows): released again unchanged, nothing is rewritten; a changed setting, a
    re-committed verdicts shard or a deleted release rebuilds it."""
    from octomed_data.stages import LocalExecutor, raise_for_failures, run_stage
    from octomed_data.stages.release import ReleaseStage

    shutil.copytree(run[0].store, tmp_path / "store")  # the module's run stays as it is
    paths = RunPaths(str(tmp_path / "store"), run[0].run_id)
    out = tmp_path / "pub"

    def release_once(**settings):
        result = run_stage(ReleaseStage(paths, str(out), **settings), LocalExecutor(progress=False))
        raise_for_failures(result)
        return result.outcomes["all"]

    first = release_once()
    card = out / "README.md"
    written = card.stat().st_mtime_ns
    again = release_once()
    assert first.state == "COMPLETED" and again.state == "REUSED"
    assert again.counts["rows"] == first.counts["rows"] > 0 and card.stat().st_mtime_ns == written
    assert release_once(all_responses=True).state == "COMPLETED"  # a changed setting
    written = card.stat().st_mtime_ns
    verdicts = storage.Dataset(paths.verdicts)
    shard = next(iter(verdicts.manifest()))
    verdicts.write_shard(shard, verdicts.read_shard(shard), extra=verdicts.shard_info(shard).extra)
    assert release_once(all_responses=True).state == "COMPLETED" and card.stat().st_mtime_ns > written
    assert release_once(all_responses=True).state == "REUSED"
    assert not [p for p in out.rglob("*") if "_done" in p.parts]  # OUT holds only the release
    shutil.rmtree(out)  # the marker stays in the run, but OUT's card is gone: released again
    assert release_once(all_responses=True).state == "COMPLETED" and card.exists()
