"""Decontaminating question datasets: one shard (local and S3) and the whole-dataset loop."""

from __future__ import annotations

import pyarrow.dataset as pads

from octomed_data import storage
from octomed_data.decontam import DecontamIndex, decontaminate_shard
from octomed_data.schema import QUESTION_SCHEMA, REMOVED_SCHEMA
from octomed_data.stages.decontaminate import decontaminate
from tests.support.decontam_rows import write_mixed_questions


def test_decontaminate_keeps_plus_removed_equals_input(index, medqa, tmp_path):
    src = str(tmp_path / "ingest" / "questions")
    dirty, clean = write_mixed_questions(src, medqa)
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
    dirty, clean = write_mixed_questions(src, medqa)
    loaded = DecontamIndex.load(index.save(f"{s3_bucket}/run/index.npz"))
    counts = decontaminate_shard(loaded, src, "00001", f"{s3_bucket}/run/dc")
    assert counts["input"] == 40 and counts["kept"] + counts["removed"] == 40 and counts["removed"] == 10
    assert storage.Dataset(f"{s3_bucket}/run/dc/removed", REMOVED_SCHEMA).num_rows() == 10
