"""Issue 22: the recipe lab's held-out imaging classification benchmark (``imaging_cls_lab``).

The bundled imaging labels (pydicom / nibabel test files, MIT: octomed_data/sample_data/LICENSES.md)
read as the demo's and lab's ``imaging_modality`` source reads them (3 per label, seed 0); the
records that sample leaves out are the test split. The benchmark is in THE table (evaluation) and in
the bundled registry pack (decontamination): a training question with one of its images is removed.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc

from evaluation.benchmarks import BENCHMARKS, LoadStats, iter_benchmark
from octomed_data.benchmarks import LAB_IMAGING_FILE, LAB_IMAGING_OPTIONS, benchmark_path
from octomed_data.decontam import DecontamIndex
from octomed_data.images import ImageStore
from octomed_data.registry import EXPECTED_ITEMS, load_registry
from octomed_data.sources import iter_records

LABELS = str(benchmark_path(Path("/nowhere"), LAB_IMAGING_FILE))  # in the package, whatever the data dir


def _training_questions() -> list[dict]:
    """What ingest gives the demo's imaging_modality source (the default: the sample, nothing else)."""
    options = {k: v for k, v in LAB_IMAGING_OPTIONS.items() if k != "rest"}
    return [row for kind, row in iter_records("imaging", LABELS, **options) if kind == "question"]


def _benchmark(tmp_path: Path, stats: LoadStats | None = None) -> list[dict]:
    store = ImageStore(str(tmp_path / "images"))
    return list(iter_benchmark(BENCHMARKS["imaging_cls_lab"], tmp_path, store, stats or LoadStats()))


def test_the_benchmark_is_the_records_the_training_sample_leaves_out(tmp_path) -> None:
    stats = LoadStats()
    items = _benchmark(tmp_path, stats)
    training = _training_questions()
    assert len(items) == stats.items == EXPECTED_ITEMS["imaging_cls_lab"] == 4
    assert stats.excluded == len(training) == 7  # the sampled records: split train, not the benchmark
    assert all(r["task_type"] == "imaging_cls" and r["split"] == "test" and r["images"] for r in items)
    held = {r["metadata"] for r in items}
    assert not held & {r["metadata"] for r in training}  # no image record in both
    # The sampled records keep their ids, options and answers whichever way the rest is read.
    both = {
        r["question_id"]: r
        for k, r in iter_records("imaging", LABELS, **LAB_IMAGING_OPTIONS)
        if k == "question"
    }
    assert all(both[q["question_id"]] == q for q in training)


def test_decontamination_removes_a_training_question_with_a_benchmark_image(tmp_path) -> None:
    table = load_registry()
    mine = table.filter(pc.equal(table["benchmark"], "imaging_cls_lab")).to_pylist()
    assert len(mine) == 4 and all(r["image_grounded"] and r["image_sha256"] for r in mine)
    items = _benchmark(tmp_path)
    assert {r["question_id"] for r in items} == {r["item_id"] for r in mine}
    index = DecontamIndex.from_registry(table)
    for row in items:  # every benchmark item is flagged, by its image
        match = index.check(row)
        assert match is not None and match.benchmark == "imaging_cls_lab" and match.kind.startswith("image")
    held = {r["image_sha256"] for r in mine}
    training = _training_questions()
    flagged = {r["metadata"]: index.check(r) for r in training}
    for row in training:
        # MR_small.dcm is sampled for training and its pixels are those of three held-out copies
        # (other DICOM encodings): decontamination removes it; the other training images stay.
        same = row["images"][0]["sha256"] in held
        assert (flagged[row["metadata"]] is not None) is same, row["metadata"]
    assert sum(m is not None for m in flagged.values()) == 1
