"""Committed-only reads (issue 25): the files standard readers see are exactly the committed shards,
whatever step of a commit is cut short; what killed writers leave is cleaned; a full disk names the
shard and ends its record FAILED; a cancelled attempt never stays RUNNING; storage errors name files.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from octomed_data import storage
from octomed_data.errors import StorageError
from octomed_data.layout import RunPaths
from octomed_data.lease import shard_lease
from octomed_data.runs import record_shard, shard_states
from octomed_data.stages import Stage
from octomed_data.stages.runner import run_guarded
from octomed_data.storage import dataset as dataset_module
from octomed_data.storage import files as files_module

SCHEMA = pa.schema([("x", pa.int64())])


def _rows(n: int, start: int = 0) -> list[dict[str, int]]:
    return [{"x": start + i} for i in range(n)]


def _reader_rows(folder: Path) -> int:
    """What ``pyarrow.dataset`` (the README's way to load an output) counts in ``folder``."""
    return pads.dataset(str(folder), format="parquet").count_rows() if folder.exists() else 0


def _glob_rows(folder: Path) -> int:
    """What ``load_dataset("parquet", data_files=folder/*.parquet)`` reads: every matching file."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))


def _assert_readers_see_committed(ds: storage.Dataset, folder: Path) -> int:
    committed = ds.num_rows()
    assert _reader_rows(folder) == committed == _glob_rows(folder)
    assert sorted(p.name for p in folder.glob("*.parquet")) == sorted(i.file for i in ds.manifest().values())
    return committed


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class Crash(BaseException):
    """Stands for a kill -9 at one step of a commit (nothing after it runs)."""


@pytest.mark.parametrize("step", ["spill", "old_file_gone", "marker_written"])
def test_a_commit_cut_short_at_any_step_leaves_readers_on_the_committed_rows(tmp_path, monkeypatch, step):
    folder = tmp_path / "d"
    ds = storage.Dataset(str(folder), SCHEMA)
    ds.write_shard("00000", _rows(100))
    ds.write_shard("00001", _rows(50))
    assert _assert_readers_see_committed(ds, folder) == 150

    writer = ds.writer("00001")
    for row in _rows(70, 1000):
        writer.add(row)
    if step == "spill":
        writer.flush()  # rows on disk in the spill file, nothing published
    else:
        real_write_json = dataset_module.write_json

        def cut(uri: str, obj: Any) -> None:
            if step == "marker_written":
                real_write_json(uri, obj)
            raise Crash(step)

        monkeypatch.setattr(dataset_module, "write_json", cut)
        with pytest.raises(Crash):
            writer.commit()
        monkeypatch.undo()
    # Whatever was cut short: readers see exactly what the markers commit.
    expected = 100 if step != "spill" else 150
    assert _assert_readers_see_committed(ds, folder) == expected
    assert ds.is_committed("00001") is (step == "spill")
    if step == "marker_written":  # the marker alone (its file absent) commits nothing
        assert (folder / "_manifest" / "00001.json").exists() and ds.shard_info("00001") is None
    writer.abort()
    # The re-run commits the shard once; no row twice, no temp file left.
    ds.write_shard("00001", _rows(70, 1000))
    assert _assert_readers_see_committed(ds, folder) == 170
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_file_without_its_marker_is_removed_by_the_next_writer_and_the_next_pass(tmp_path):
    """What older versions (file first, marker second) left after a kill -9: 305 rows seen, 300 committed."""
    folder = tmp_path / "d"
    ds = storage.Dataset(str(folder), SCHEMA)
    ds.write_shard("00000", _rows(300))
    for shard in ("00001", "00002"):  # committed files whose markers never came
        pq.write_table(pa.Table.from_pylist(_rows(5), schema=SCHEMA), folder / f"part-{shard}.parquet")
    assert _reader_rows(folder) == 310 and ds.num_rows() == 300
    ds.writer("00001").abort()  # a new writer of the shard clears its orphan at once
    assert not (folder / "part-00001.parquet").exists() and _reader_rows(folder) == 305
    assert ds.drop_stale(keep=["00000"]) == []  # the pass's cleaner: nothing committed was stale...
    assert _assert_readers_see_committed(ds, folder) == 300  # ...and the orphan is gone
    # ``owns`` keeps a cleaner to its own shards (several ingests into one folder).
    pq.write_table(pa.Table.from_pylist(_rows(5), schema=SCHEMA), folder / "part-other-00000.parquet")
    ds.drop_stale(keep=["00000"], owns=lambda name: not name.startswith("other-"))
    assert (folder / "part-other-00000.parquet").exists()
    ds.drop_stale(keep=["00000"])
    assert _assert_readers_see_committed(ds, folder) == 300


def test_dead_writers_temp_files_are_cleaned_and_live_ones_kept(tmp_path):
    folder = tmp_path / "d"
    ds = storage.Dataset(str(folder), SCHEMA)
    ds.write_shard("00000", _rows(3))
    host = files_module.temp_name("x").split("~")[2]
    dead, me = _dead_pid(), os.getpid()
    leftovers = {
        f".part-00001.parquet~{dead}~{host}~ab12.tmp": True,  # a killed writer of this host
        f".part-00002.parquet~{dead}~{host}~cd34.tmp": True,
        ".part-00003.parquet.k2j_9x.tmp": True,  # older naming, untouched for over an hour
        f".part-00004.parquet~{me}~{host}~ef56.tmp": False,  # a live writer (this process)
        ".part-00005.parquet.fresh1.tmp": False,  # older naming, just written: maybe live
        f".part-00006.parquet~{dead}~other-host~aa11.tmp": False,  # another host's, recent
    }
    for name in leftovers:
        (folder / name).write_bytes(b"half a parquet file")
    (folder / "_manifest" / f".00002.json~{dead}~{host}~77.tmp").write_bytes(b"{")
    old = time.time() - 2 * files_module.LEFTOVER_AGE_S
    os.utime(folder / ".part-00003.parquet.k2j_9x.tmp", (old, old))
    # The next writer of shard 00001 clears that shard's leftovers (and other dead ones) first.
    writer = ds.writer("00001")
    assert not (folder / f".part-00001.parquet~{dead}~{host}~ab12.tmp").exists()
    assert Path(writer.spill).exists() and Path(writer.spill).parent == folder
    writer.add({"x": 1})
    writer.commit()
    assert not Path(writer.spill).exists()  # on success: renamed into place
    ds.drop_stale(keep=["00000", "00001"])  # the next pass clears the rest
    left = {p.name for p in folder.iterdir()} | {p.name for p in (folder / "_manifest").iterdir()}
    for name, dead_one in leftovers.items():
        assert (name not in left) is dead_one, name
    assert not any(n.startswith(".00002.json") for n in left)
    assert _assert_readers_see_committed(ds, folder) == 4


def test_an_atomic_write_that_fails_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", full)
    with pytest.raises(StorageError, match=r"no space left on the device writing .*state\.json"):
        storage.write_json(str(tmp_path / "state.json"), {"a": 1})
    assert list(tmp_path.iterdir()) == []


class DiskStage(Stage):
    """``in`` -> ``out`` through the shard writer (the disk-full and cancel cases)."""

    name = "disk"

    def __init__(self, paths: RunPaths, interrupt: BaseException | None = None) -> None:
        super().__init__(paths)
        self.interrupt = interrupt

    def input_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.paths.local("in"), SCHEMA)

    def done_dataset(self) -> storage.Dataset:
        return storage.Dataset(self.paths.local("out"), SCHEMA)

    def run_shard(self, shard: str) -> dict[str, Any]:
        if self.interrupt is not None:
            raise self.interrupt
        rows = self.input_dataset().read_shard(shard).to_pylist()
        self.done_dataset().write_shard(shard, rows, extra=self.marker_extra(shard, {"rows": len(rows)}))
        return {"rows": len(rows)}


def _disk_run(tmp_path: Path) -> RunPaths:
    paths = RunPaths.at(str(tmp_path / "run"))
    storage.Dataset(paths.local("in"), SCHEMA).write_shard("medqa", _rows(10))
    return paths


def test_a_full_disk_names_the_shard_and_ends_its_record_failed(tmp_path, monkeypatch):
    paths = _disk_run(tmp_path)
    stage = DiskStage(paths)
    state = Path(paths.state_uri("disk", "medqa"))
    real_open = builtins.open
    disk_full = []

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        """A full disk: a new file gets no block (an existing one can be rewritten in place)."""
        if disk_full and any(c in mode for c in "wax") and not os.path.exists(file):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    def full_write(self: Any, *args: Any, **kwargs: Any) -> None:
        disk_full.append(True)  # from here on the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    # The disk fills while the shard's rows are written: its spill and every new file fail.
    original = pq.ParquetWriter.write_table
    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_write)
    monkeypatch.setattr(files_module, "open", full_open, raising=False)
    with pytest.raises(StorageError) as err:
        run_guarded(stage, "medqa", ttl_s=5)
    message = str(err.value)
    assert "shard medqa" in message and "part-medqa.parquet" in message and "no space left" in message
    assert "state" not in message
    record = json.loads(state.read_text())
    assert record["state"] == "FAILED" and "part-medqa.parquet" in record["error"]
    assert not [p for p in Path(paths.root).rglob("*.tmp")]  # no spill or temp file stays
    assert [s["state"] for s in shard_states(paths, "disk")] == ["FAILED"]
    # Room again: the re-run commits the shard.
    monkeypatch.setattr(pq.ParquetWriter, "write_table", original)
    monkeypatch.setattr(files_module, "open", real_open, raising=False)
    assert run_guarded(stage, "medqa", ttl_s=5).state == "COMPLETED"
    assert json.loads(state.read_text())["state"] == "COMPLETED"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), SystemExit(143)])
def test_a_cancelled_attempt_does_not_stay_running(tmp_path, interrupt):
    paths = _disk_run(tmp_path)
    with pytest.raises(type(interrupt)):
        run_guarded(DiskStage(paths, interrupt=interrupt), "medqa", ttl_s=5)
    (record,) = shard_states(paths, "disk")
    assert record["state"] in ("FAILED", "CANCELLED") and record["error"]


def test_a_running_record_whose_writer_is_gone_reads_failed(tmp_path):
    """kill -9, SIGTERM or a cancel before the attempt could record its end: RUNNING forever before."""
    paths = _disk_run(tmp_path)
    for shard, how in (("a", "released"), ("b", "expired"), ("c", "live"), ("d", "never leased")):
        record_shard(paths, "disk", shard, "RUNNING", attempt=1)
        if how != "never leased":
            lease = shard_lease(paths, "disk", shard, f"job-{shard}", ttl_s=0.2 if how == "expired" else 60)
            lease.acquire()
            if how == "released":
                lease.release()
    time.sleep(0.3)
    states = {s["shard"]: s for s in shard_states(paths, "disk")}
    assert {k: v["state"] for k, v in states.items()} == {
        "a": "FAILED",
        "b": "FAILED",
        "c": "RUNNING",
        "d": "RUNNING",
    }
    assert "cancelled" in states["a"]["error"] and "expired" in states["b"]["error"]
    # A released lease: the record itself now says FAILED (written under the shard's lease).
    on_disk = json.loads(Path(paths.state_uri("disk", "a")).read_text())
    assert on_disk["state"] == "FAILED" and on_disk["attempt"] == 1
    assert json.loads(Path(paths.state_uri("disk", "b")).read_text())["state"] == "RUNNING"


def test_storage_read_errors_name_the_file(tmp_path):
    folder = tmp_path / "d"
    ds = storage.Dataset(str(folder), SCHEMA)
    ds.write_shard("00000", _rows(3))
    (folder / "part-00000.parquet").write_bytes(b"not parquet at all")
    for read in (lambda: ds.read_shard("00000"), lambda: list(ds.iter_batches()), ds.read_all):
        with pytest.raises(StorageError, match=r"not a readable Parquet file: .*part-00000\.parquet"):
            read()
    (folder / "_manifest" / "00000.json").write_text("{broken")
    with pytest.raises(StorageError, match=r"unreadable shard marker .*_manifest/00000\.json"):
        ds.manifest()
    with pytest.raises(StorageError, match=r"unreadable shard marker .*_manifest/00000\.json"):
        ds.shard_info("00000")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(StorageError, match=r"unreadable JSON in .*x\.json"):
        storage.read_json(str(tmp_path / "x.json"))
    with pytest.raises(ValueError):  # still a ValueError for callers that catch one
        storage.read_json(str(tmp_path / "x.json"))


def test_a_rewrite_clears_a_killed_writers_temp_file_of_the_same_file(tmp_path):
    """A config or state record whose earlier write was killed midway: its temp file goes with the next write."""
    host = files_module.temp_name("x").split("~")[2]
    dead = _dead_pid()
    (tmp_path / f".config.json~{dead}~{host}~ab12.tmp").write_text('{"half":')
    live = tmp_path / f".config.json~{os.getpid()}~{host}~cd34.tmp"  # this process: maybe mid-write
    live.write_text("{")
    storage.write_json(str(tmp_path / "config.json"), {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "config.json"]


def test_a_listing_clears_dead_writers_temp_files(tmp_path):
    """A journal segment whose write was killed midway: its name is never written again; the next
    pass's listing of the folder removes the temp file."""
    host = files_module.temp_name("x").split("~")[2]
    (tmp_path / "0001-a.jsonl.zst").write_bytes(b"x")
    dead = tmp_path / f".0002-b.jsonl.zst~{_dead_pid()}~{host}~ab12.tmp"
    dead.write_bytes(b"half")
    assert storage.list_files(str(tmp_path)) == [str(tmp_path / "0001-a.jsonl.zst")]
    assert not dead.exists()


def test_ingest_on_a_full_disk_names_the_shard_file_and_records_failed(shared_data, tmp_path, monkeypatch):
    """The reported case: the error said ``state/ingest/medqa.json`` and the record stayed RUNNING."""
    from octomed_data.stages.ingest import ingest

    real_open = builtins.open
    disk_full = []

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if disk_full and any(c in mode for c in "wax") and not os.path.exists(file):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    def full_write(self: Any, *args: Any, **kwargs: Any) -> None:
        disk_full.append(True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_write)
    monkeypatch.setattr(files_module, "open", full_open, raising=False)
    out = tmp_path / "out"
    with pytest.raises(Exception) as err:
        ingest("medqa", str(shared_data / "medqa" / "medqa_input.head200.jsonl"), str(out), shard_size=50)
    assert "no space left on the device writing" in str(err.value) and "part-00000.parquet" in str(err.value)
    assert "state/ingest" not in str(err.value)
    record = json.loads((out / "state" / "ingest" / "medqa.json").read_text())
    assert record["state"] == "FAILED" and "questions/part-00000.parquet" in record["error"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
