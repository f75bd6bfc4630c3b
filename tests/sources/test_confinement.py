"""Image references stay inside the source's images root (issue 25).

A record may name its image with ``../`` escapes, an absolute path, a ``file://`` or ``s3://`` URI
of another place or bucket, or an ``http(s)://`` address. Only files below the images root given
for the source (else the input file's folder) are read: the rest is quarantined as
``image_outside_root`` / ``remote_image_refused`` before the outside file is touched, and its bytes
appear in no output. Valid records of the same source still ingest.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from octomed_data import storage
from octomed_data.images import ImageStore
from octomed_data.sources import iter_records
from octomed_data.sources.paths import SourcePath
from octomed_data.stages.ingest import ingest

SECRET_TEXT = b"root:x:0:0:TOP-SECRET-MARKER-4f1c9e:/root:/bin/bash\n"


@pytest.fixture
def touched(monkeypatch) -> list[str]:
    """Every location the loaders stat, open or hand to the image store, in call order."""
    seen: list[str] = []
    original_exists, original_open, original_put = SourcePath.exists, SourcePath.open, ImageStore.put

    def exists(self):
        seen.append(self.uri)
        return original_exists(self)

    def open_(self):
        seen.append(self.uri)
        return original_open(self)

    def put(self, path):
        seen.append(str(path))
        return original_put(self, path)

    monkeypatch.setattr(SourcePath, "exists", exists)
    monkeypatch.setattr(SourcePath, "open", open_)
    monkeypatch.setattr(ImageStore, "put", put)
    return seen


def _vqa_rad_with_images(shared_data: Path, n: int) -> list[dict]:
    """The first ``n`` real VQA-RAD test records whose image is among the bundled ones."""
    have = {p.name for p in (shared_data / "vqa_rad/images").glob("*.jpg")}
    records = json.loads((shared_data / "vqa_rad/testset.json").read_text())
    picked, images = [], set()
    for rec in records:
        if rec["image_name"] in have and rec["image_name"] not in images:
            picked.append(rec)
            images.add(rec["image_name"])
        if len(picked) == n:
            return picked
    raise AssertionError("not enough VQA-RAD records with bundled images")


def _secret_files(shared_data: Path, folder: Path) -> tuple[Path, Path]:
    """A real image and a passwd-like text, outside every images root."""
    folder.mkdir(parents=True, exist_ok=True)
    scan = folder / "scan.png"
    shutil.copy(sorted((shared_data / "omnimedvqa/images").glob("*.png"))[0], scan)
    passwd = folder / "passwd"
    passwd.write_bytes(SECRET_TEXT)
    return scan, passwd


def _output_bytes(out: Path) -> dict[Path, bytes]:
    """Every output file's bytes; Parquet also decoded (its pages are compressed)."""
    blobs = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        blob = path.read_bytes()
        if path.suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
            blob += json.dumps(rows, default=str, ensure_ascii=False).encode()
        blobs[path] = blob
    return blobs


def _normalised_sha(image: Path) -> str:
    return ImageStore(None).put(str(image))[0]["sha256"]


def test_vqa_rad_escapes_absolute_and_remote_refs_are_quarantined_unread(shared_data, tmp_path, touched):
    root = tmp_path / "base" / "images"  # the images root given for the source
    root.mkdir(parents=True)
    valid = _vqa_rad_with_images(shared_data, 3)
    for rec in valid:
        shutil.copy(shared_data / "vqa_rad/images" / rec["image_name"], root / rec["image_name"])
    private = tmp_path / "private"
    scan, passwd = _secret_files(shared_data, private)
    shutil.copy(scan, tmp_path / "base" / "scan.png")  # next to the root, not in it
    attacks = {
        "../../private/scan.png": "image_outside_root",  # root/../../private = tmp_path/private
        "../scan.png": "image_outside_root",
        "sub/../../../private/passwd": "image_outside_root",
        str(scan): "image_outside_root",
        f"file://{scan}": "image_outside_root",
        "/etc/passwd": "image_outside_root",
        str(passwd): "image_outside_root",
        "http://127.0.0.1:9/scan.png": "remote_image_refused",
        "https://example.org/images/scan.png": "remote_image_refused",
        "HTTP://example.org/x.png": "remote_image_refused",
    }
    template = valid[0]
    bad = [dict(template, qid=9000 + i, image_name=ref) for i, ref in enumerate(attacks)]
    src = tmp_path / "src"
    src.mkdir()
    (src / "testset.json").write_text(json.dumps(valid + bad))

    out = tmp_path / "out"
    result = ingest("vqa_rad", str(src / "testset.json"), str(out), images=str(root))

    assert result.records == len(valid) + len(attacks)
    assert result.questions == len(valid)  # the valid records of the same source still ingest
    assert result.reasons == {"image_outside_root": 7, "remote_image_refused": 3}
    assert result.images_stored == len(valid)
    quarantined = storage.Dataset(result.quarantine_uri).read_all().to_pylist()
    by_ref = {json.loads(q["raw"])["image_name"]: q for q in quarantined}
    assert {ref: by_ref[ref]["reason"] for ref in attacks} == attacks
    assert all(q["detail"] for q in quarantined)
    # Nothing outside the root was stat'ed, opened or given to the image store.
    outside = [u for u in touched if "/private/" in u or u.startswith(("/etc", "http")) or "base/scan" in u]
    assert outside == []
    # The outside files' bytes are in no output file.
    blobs = _output_bytes(out)
    assert any(p.suffix == ".png" for p in blobs) and any(p.suffix == ".parquet" for p in blobs)
    secret_image = scan.read_bytes()
    secret_sha = _normalised_sha(scan)
    for path, blob in blobs.items():
        assert SECRET_TEXT not in blob and b"TOP-SECRET-MARKER" not in blob, path
        assert secret_image[64:4096] not in blob, path
        assert secret_sha.encode() not in blob, path
    questions = storage.Dataset(result.questions_uri).read_all().to_pylist()
    assert sorted(json.loads(q["metadata"])["qid"] for q in questions) == sorted(r["qid"] for r in valid)


def test_without_images_the_input_folder_is_the_root(shared_data, tmp_path, touched):
    src = tmp_path / "src"
    (src / "pics").mkdir(parents=True)
    valid = _vqa_rad_with_images(shared_data, 2)
    for rec in valid:
        shutil.copy(shared_data / "vqa_rad/images" / rec["image_name"], src / "pics" / rec["image_name"])
    scan, _ = _secret_files(shared_data, tmp_path / "private")
    records = [dict(rec, image_name=f"pics/{rec['image_name']}") for rec in valid]
    records += [
        dict(valid[0], qid=1, image_name="../private/scan.png"),
        dict(valid[0], qid=2, image_name=str(scan)),
    ]
    (src / "test.json").write_text(json.dumps(records))
    rows = list(iter_records("vqa_rad", str(src / "test.json"), image_store=ImageStore(None)))
    assert [k for k, _ in rows] == ["question", "question", "quarantine", "quarantine"]
    assert {r["reason"] for k, r in rows if k == "quarantine"} == {"image_outside_root"}
    assert not [u for u in touched if "/private/" in u]


def test_other_bucket_and_outside_keys_are_quarantined_unread(
    shared_data, tmp_path, s3_endpoint, s3_bucket, touched
):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing")
    other = f"{s3_bucket}-other"
    fs.mkdir(other.removeprefix("s3://"))
    fs.invalidate_cache()
    valid = _vqa_rad_with_images(shared_data, 3)
    for rec in valid:
        img = (shared_data / "vqa_rad/images" / rec["image_name"]).read_bytes()
        storage.write_bytes(f"{s3_bucket}/images/{rec['image_name']}", img)
    scan, _ = _secret_files(shared_data, tmp_path / "secret")
    storage.write_bytes(f"{other}/secret/scan.png", scan.read_bytes())
    storage.write_bytes(f"{other}/secret/passwd", SECRET_TEXT)
    storage.write_bytes(f"{s3_bucket}/private/scan.png", scan.read_bytes())  # same bucket, outside the root
    other_bucket = other.removeprefix("s3://")
    attacks = {
        f"{other}/secret/scan.png": "image_outside_root",
        f"{other}/secret/passwd": "image_outside_root",
        f"../../{other_bucket}/secret/scan.png": "image_outside_root",  # bucket/images/../../other
        f"{s3_bucket}/private/scan.png": "image_outside_root",
        "../private/scan.png": "image_outside_root",
        f"s3a://{other_bucket}/secret/scan.png": "image_outside_root",
        str(scan): "image_outside_root",  # a local path while the root is a bucket
        f"https://{other_bucket}.s3.amazonaws.com/secret/scan.png": "remote_image_refused",
    }
    # One valid record names its image by a full URI inside the root: accepted.
    records = [dict(valid[0], image_name=f"{s3_bucket}/images/{valid[0]['image_name']}"), *valid[1:]]
    records += [dict(valid[0], qid=8000 + i, image_name=ref) for i, ref in enumerate(attacks)]
    storage.write_bytes(f"{s3_bucket}/data/testset.json", json.dumps(records).encode())

    out = tmp_path / "out"
    result = ingest("vqa_rad", f"{s3_bucket}/data/testset.json", str(out), images=f"{s3_bucket}/images")

    assert result.questions == len(valid) and result.images_stored == len(valid)
    assert result.reasons == {"image_outside_root": 7, "remote_image_refused": 1}
    quarantined = storage.Dataset(result.quarantine_uri).read_all().to_pylist()
    assert {json.loads(q["raw"])["image_name"]: q["reason"] for q in quarantined} == attacks
    assert not [u for u in touched if other_bucket in u or "/private/" in u or "/secret/" in u]
    assert all(u.startswith(f"{s3_bucket}/") for u in touched if u.startswith("s3"))
    secret_sha = _normalised_sha(scan)
    for path, blob in _output_bytes(out).items():
        assert b"TOP-SECRET-MARKER" not in blob and secret_sha.encode() not in blob, path
        assert scan.read_bytes()[64:4096] not in blob, path


# --- the same rule in every loader that reads image references -----------------------------------

ESCAPES = ["../../private/scan.png", "{scan}", "file://{scan}", "https://example.org/scan.png"]
REASONS = ["image_outside_root", "image_outside_root", "image_outside_root", "remote_image_refused"]


def _refs(scan: Path) -> list[str]:
    return [r.format(scan=scan) for r in ESCAPES]


def _slake(shared_data, src, root, refs):
    recs = [r for r in json.loads((shared_data / "slake/test.json").read_text()) if r["q_lang"] == "en"][:1]
    (root / recs[0]["img_name"]).parent.mkdir(parents=True)
    shutil.copy(next((shared_data / "vqa_rad/images").glob("*.jpg")), root / recs[0]["img_name"])
    (src / "test.json").write_text(json.dumps(recs + [dict(recs[0], img_name=r) for r in refs]))
    return "slake", src / "test.json"


def _omnimedvqa(shared_data, src, root, refs):
    recs = json.loads((shared_data / "omnimedvqa/MRI_CT_XRAY_300each_dataset.json").read_text())
    have = {p.name for p in (shared_data / "omnimedvqa/images").glob("*.png")}
    rec = next(r for r in recs if r["image"][0].split("/")[-1] in have)
    (root / "images").mkdir()
    shutil.copy(shared_data / "omnimedvqa" / rec["image"][0], root / rec["image"][0])
    (src / "omni_test.json").write_text(json.dumps([rec] + [dict(rec, image=[r]) for r in refs]))
    return "omnimedvqa", src / "omni_test.json"


def _medxpertqa(shared_data, src, root, refs):
    rec = json.loads((shared_data / "medxpertqa/medxpertqa_mm_input.jsonl").open().readline())
    for im in rec["images"]:
        shutil.copy(next((shared_data / "vqa_rad/images").glob("*.jpg")), root / im["image_path"])
    lines = [rec] + [dict(rec, images=[rec["images"][0], {"image_path": r}]) for r in refs]
    (src / "mm_input.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return "medxpertqa", src / "mm_input.jsonl"


def _pathvqa(shared_data, src, root, refs):
    entries = json.loads((shared_data / "pathvqa/pvqa_test.json").read_text())
    entry = next(e for e in entries if len(e["sentf"]["pvqa"]) == 1)
    shutil.copy(next((shared_data / "vqa_rad/images").glob("*.jpg")), root / f"{entry['img_id']}.jpg")
    # PathVQA names images by id: the loader appends .jpg/.png/.jpeg.
    attacks = [dict(entry, img_id=r.removesuffix(".png")) for r in refs]
    (src / "pvqa_test.json").write_text(json.dumps([entry] + attacks))
    return "pathvqa", src / "pvqa_test.json"


def _imaging(shared_data, src, root, refs):
    for i, p in enumerate(sorted((shared_data / "vqa_rad/images").glob("*.jpg"))[:2]):
        shutil.copy(p, root / f"ok{i}.jpg")
    with (src / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([["ok0.jpg", "CT"], ["ok1.jpg", "MR"]] + [[r, "CT"] for r in refs])
    return "imaging", src / "labels.csv"


def _pmc_vqa(shared_data, src, root, refs):
    shutil.copy(next((shared_data / "vqa_rad/images").glob("*.jpg")), root / "PMC1_F1.jpg")
    cols = [
        "Figure_path",
        "Question",
        "Answer",
        "Choice A",
        "Choice B",
        "Choice C",
        "Choice D",
        "Answer_label",
    ]
    row = ["PMC1_F1.jpg", "Which modality?", "CT", "A:CT", "B:MRI", "C:X-ray", "D:PET", "A"]
    with (src / "test.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([cols, row] + [[r, *row[1:]] for r in refs])
    return "pmc_vqa", src / "test.csv"


def _hf(shared_data, src, root, refs):
    shutil.copy(next((shared_data / "vqa_rad/images").glob("*.jpg")), root / "fig.jpg")
    base = {"Question": "Which modality?", "Answer_label": "A", "Answer": "CT"}
    base |= {"Choice A": "A:CT", "Choice B": "B:MRI", "Choice C": "C:X-ray", "Choice D": "D:PET"}
    rows = [dict(base, Figure_path=p, image={"bytes": None, "path": p}) for p in ["fig.jpg", *refs]]
    datasets.Dataset.from_list(rows).to_parquet(str(src / "test.parquet"))
    return "hf", src / "test.parquet"


@pytest.mark.parametrize("build", [_slake, _omnimedvqa, _medxpertqa, _pathvqa, _imaging, _pmc_vqa, _hf])
def test_every_loader_confines_image_refs(shared_data, tmp_path, touched, build):
    src, root = tmp_path / "src", tmp_path / "root"
    src.mkdir()
    root.mkdir()
    scan, _ = _secret_files(shared_data, tmp_path / "private")
    shutil.copy(scan, tmp_path / "private" / "scan.jpg")  # PathVQA tries .jpg first
    fmt, path = build(shared_data, src, root, _refs(scan))
    options = {"mapping": "pmc_vqa"} if fmt == "hf" else {}
    rows = list(iter_records(fmt, str(path), image_store=ImageStore(None), images_dir=str(root), **options))
    questions = [r for k, r in rows if k == "question"]
    quarantined = [r for k, r in rows if k == "quarantine"]
    assert questions, f"{fmt}: the valid record(s) must still ingest"
    assert [q["reason"] for q in quarantined] == REASONS, [q["detail"] for q in quarantined]
    assert not [u for u in touched if "/private/" in u or u.startswith("http")]
