"""Per-record resource limits (issue 25): decoders check the sizes a file declares before they
allocate, so one hostile image is one quarantined record (``image_too_large``), never a
``MemoryError`` that stops its source."""

from __future__ import annotations

import csv
import gzip
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from octomed_data import image_limits, storage
from octomed_data.images import ImageStore, load_image
from octomed_data.schema import RecordError
from octomed_data.stages.ingest import ingest


def nifti2_bomb(path: Path) -> Path:
    """A gzipped NIfTI-2 header (72 bytes) declaring 100000^3 uint8 voxels, and no data."""
    import nibabel as nib

    header = nib.Nifti2Header()
    header.set_data_shape((100_000, 100_000, 100_000))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 544
    header.set_sform(np.eye(4), code=1)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4, compresslevel=9, mtime=0))
    return path


def png_bomb(path: Path, side: int) -> Path:
    """A valid 1-bit PNG of side x side black pixels: a few KB that decode to side^2 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, packer = b"\0" * (1 + (side + 7) // 8), zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_a_100000_cubed_nifti_is_refused_from_its_header(tmp_path):
    bomb = nifti2_bomb(tmp_path / "bomb.nii.gz")
    assert bomb.stat().st_size < 100
    with pytest.raises(RecordError) as err:
        load_image(bomb)
    assert err.value.reason == "image_too_large" and "NIfTI volume" in err.value.detail


@pytest.mark.parametrize("side", [10_000, 30_000])  # over our limit; over PIL's own (2x) too
def test_decompression_bomb_pngs_are_refused(tmp_path, side):
    bomb = png_bomb(tmp_path / "bomb.png", side)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(RecordError) as err:
        load_image(bomb)
    assert err.value.reason == "image_too_large"


def test_dicom_declaring_huge_frames_is_refused_before_decoding(shared_data, tmp_path):
    import pydicom

    ds = pydicom.dcmread(shared_data / "dicom/pydicom/CT_small.dcm")
    ds.Rows, ds.Columns = 60_000, 60_000
    ds.save_as(tmp_path / "wide.dcm")
    ds = pydicom.dcmread(shared_data / "dicom/pydicom/CT_small.dcm")
    ds.NumberOfFrames = 1_000_000
    ds.save_as(tmp_path / "frames.dcm")
    for name, said in (("wide.dcm", "60000x60000"), ("frames.dcm", "1000000 frames")):
        with pytest.raises(RecordError) as err:
            load_image(tmp_path / name)
        assert err.value.reason == "image_too_large" and said in err.value.detail, err.value.detail
    assert load_image(shared_data / "dicom/pydicom/CT_small.dcm").image.size == (128, 128)


def test_file_bytes_and_memory_errors_are_one_record(shared_data, tmp_path, monkeypatch):
    real = shared_data / "nifti/nibabel/anatomical.nii"
    monkeypatch.setattr(image_limits, "MAX_IMAGE_BYTES", real.stat().st_size - 1)
    with pytest.raises(RecordError, match="file bytes") as err:
        load_image(real)
    assert err.value.reason == "image_too_large"
    monkeypatch.undo()

    def exhausted(path):
        raise MemoryError

    monkeypatch.setattr("octomed_data.images.load_nifti", exhausted)
    with pytest.raises(RecordError) as err:
        load_image(real)
    assert err.value.reason == "image_too_large" and "memory" in err.value.detail


def test_remote_image_over_the_byte_limit_is_not_read(shared_data, tmp_path, monkeypatch):
    src = shared_data / "dicom/pydicom/CT_small.dcm"
    monkeypatch.setattr(image_limits, "MAX_IMAGE_BYTES", src.stat().st_size - 1)
    monkeypatch.setattr(storage, "read_bytes", lambda uri: pytest.fail(f"read {uri}"))
    with pytest.raises(RecordError) as err:
        ImageStore(None).put(_memory_copy(src))
    assert err.value.reason == "image_too_large"


def _memory_copy(src: Path) -> str:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/limits/CT_small.dcm", src.read_bytes())
    return "memory://limits/CT_small.dcm"


# The 18 good records: real DICOM and NIfTI files from the shared data (distinct pixels: the
# MR_small variants decode to one image), and 9 VQA-RAD test images.
GOOD = [
    *(f"dicom/pydicom/{n}" for n in ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "JPEG2000.dcm")),
    "nifti/nibabel/0.dcm",
    *(f"nifti/nibabel/{n}" for n in ("anatomical.nii", "functional.nii", "example4d.nii.gz")),
    "nifti/nibabel/example_nifti2.nii.gz",
]


def test_a_20_record_imaging_source_quarantines_the_two_bombs_and_keeps_18(shared_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for rel in GOOD:
        shutil.copy(shared_data / rel, src / Path(rel).name)
        rows.append((Path(rel).name, "CT" if "CT" in rel or "liver" in rel else "MR"))
    jpgs = sorted((shared_data / "vqa_rad/images").glob("*.jpg"))[:9]
    for jpg in jpgs:
        shutil.copy(jpg, src / jpg.name)
        rows.append((jpg.name, "radiograph"))
    rows.insert(7, (nifti2_bomb(src / "bomb.nii.gz").name, "MR"))
    rows.insert(13, (png_bomb(src / "bomb.png", 10_000).name, "radiograph"))
    with (src / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    assert len(rows) == 20

    result = ingest("imaging", str(src / "labels.csv"), str(tmp_path / "out"))
    assert result.reasons == {"image_too_large": 2}
    assert (result.records, result.questions, result.quarantined) == (20, 18, 2)
    quarantined = storage.Dataset(result.quarantine_uri).read_all().to_pylist()
    assert Counter((q["record_index"], q["reason"]) for q in quarantined) == {
        (7, "image_too_large"): 1,
        (13, "image_too_large"): 1,
    }
    questions = storage.Dataset(result.questions_uri).read_all().to_pylist()
    kept = sorted(q["metadata"] for q in questions)
    assert len(kept) == 18 and not any("bomb" in m for m in kept)
    assert all(q["images"] and q["images"][0]["uri"] for q in questions)
