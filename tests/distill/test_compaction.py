"""Compact journal, retired after compaction; the shard writer spills to disk and publishes atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from octomed_data import storage
from octomed_data.distill import distill_shard, is_shard_done, read_done_keys
from octomed_data.distill.journal import ARCHIVE_DIR, SEGMENT_SUFFIX, iter_journal, segment_uris
from octomed_data.sandbox import FaultConfig, start_sandbox
from tests.support.distill import config, make_questions, read_raw


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-transport-000000001")


def test_journal_is_compressed_then_retired_and_done_keys_survive(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 10)
    with start_sandbox() as sb:
        kept = distill_shard(q_uri, "00000", str(tmp_path / "kept"), config(sb.base_url), journal="keep")
        report = distill_shard(q_uri, "00000", out, config(sb.base_url))
    assert kept.complete and report.complete
    segments = segment_uris(str(tmp_path / "kept"), "00000")
    assert segments and all(u.endswith(SEGMENT_SUFFIX) for u in segments)
    assert len(list(iter_journal(str(tmp_path / "kept"), "00000"))) == 40
    # Retired: no segment left; the committed raw shard still says every key is done.
    assert segment_uris(out, "00000") == [] and not list(iter_journal(out, "00000"))
    done, failed = read_done_keys(out, "00000")
    assert len(done) == 40 and not failed and is_shard_done(out, "00000")
    # The compressed journal is no bigger than twice the Parquet it compacts into.
    journal_bytes = sum(os.path.getsize(u) for u in segments)
    parquet = storage.Dataset(storage.join(str(tmp_path / "kept"), "raw")).shard_info("00000")
    assert journal_bytes <= 2 * parquet.bytes


def test_incomplete_shard_resumes_from_its_committed_rows_after_the_journal_is_gone(tmp_path: Path) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 6)
    flaky = FaultConfig(seed=3, server_error=0.5, max_faults_per_request=10**6)
    with start_sandbox(faults=flaky) as sb:
        first = distill_shard(q_uri, "00000", out, config(sb.base_url, samples=2, max_attempts=2))
    assert not first.complete and 0 < first.failed and segment_uris(out, "00000") == []
    with start_sandbox() as sb:
        again = distill_shard(q_uri, "00000", out, config(sb.base_url, samples=2, max_attempts=2))
        asked = sb.stats()["requests"]
    assert again.complete and asked == first.failed and again.stored_before == first.stored
    rows = read_raw(out)
    assert len(rows) == 12 and len({(r["question_id"], r["sample_idx"]) for r in rows}) == 12
    assert all(r["reject_reason"] != "request_failed" for r in rows)


def test_journal_can_be_archived(tmp_path: Path, monkeypatch) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    make_questions(q_uri, 3)
    monkeypatch.setenv("OCTOMED_JOURNAL_AFTER_COMPACT", "archive")
    with start_sandbox() as sb:
        assert distill_shard(q_uri, "00000", out, config(sb.base_url)).complete
    assert segment_uris(out, "00000") == []
    archived = storage.list_files(storage.join(out, ARCHIVE_DIR, "00000"))
    assert archived and all(u.endswith(SEGMENT_SUFFIX) for u in archived)


def _dataset(root: str) -> storage.Dataset:
    schema = pa.schema([("key", pa.string()), ("text", pa.string())])
    return storage.Dataset(storage.join(root, "d"), schema)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_shard_writer_spills_bounded_row_groups_and_publishes_atomically(tmp_path: Path, where: str) -> None:
    root = str(tmp_path) if where == "local" else f"memory://spill-{tmp_path.name}"
    ds = _dataset(root)
    writer = storage.ShardWriter(ds, "00000", rows_per_group=10_000, bytes_per_group=256 * 1024)
    big = "x" * 32 * 1024
    for i in range(100):
        writer.add({"key": str(i), "text": big})
        # Never more than ~256 KB of text held: the rest is already in the spill file.
        assert writer.buffered_bytes < 256 * 1024 + len(big) and len(writer.buffer) <= 8
    assert os.path.exists(writer.spill) and os.path.getsize(writer.spill) > 0
    assert not ds.manifest() and not storage.exists(ds.file_uri("00000"))  # nothing visible yet
    info = writer.commit({"k": 1})
    assert not os.path.exists(writer.spill)
    assert info.rows == 100 and ds.read_shard("00000").num_rows == 100
    if where == "local":
        assert sorted(os.listdir(tmp_path / "d")) == ["_manifest", "part-00000.parquet"]
        assert info.bytes == os.path.getsize(tmp_path / "d" / "part-00000.parquet")


def test_an_abandoned_shard_writer_leaves_nothing(tmp_path: Path) -> None:
    ds = _dataset(str(tmp_path))
    writer = ds.writer("00001")
    writer.add({"key": "a", "text": "b"})
    spill = writer.spill
    writer.abort()
    assert not os.path.exists(spill) and not ds.manifest()
    writer = ds.writer("00002")
    spill = writer.spill
    del writer  # dropped without commit (an exception unwound past it)
    assert not os.path.exists(spill)
