"""The storage layer on local disk and on a real S3-compatible server (moto, loopback):
atomic shard commits, manifest row counts, re-writes, and loading outputs with pyarrow.dataset
and datasets.load_dataset; ingest straight to S3."""

from __future__ import annotations

import posixpath
import threading

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from octomed_data import storage
from octomed_data.errors import StorageError
from octomed_data.schema import QUESTION_SCHEMA, question_row
from octomed_data.stages.ingest import ingest


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A dataset root on local disk or in a fresh bucket of the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def _questions(n: int, offset: int = 0, pad: int = 0) -> list[dict]:
    return [
        question_row(
            source="test",
            split="train",
            task_type="text_mcq",
            question=f"Question number {i}? " + "x" * pad,
            options={"A": "first", "B": "second"},
            answer="A" if i % 2 else "B",
            input_file="synthetic.jsonl",
            record_index=i,
        )
        for i in range(offset, offset + n)
    ]


def test_manifest_counts_and_rewrite_replaces(root):
    ds = storage.Dataset(storage.join(root, "questions"), QUESTION_SCHEMA)
    assert ds.manifest() == {} and ds.num_rows() == 0
    ds.write_shard(0, _questions(30), extra={"entry": "a"})
    ds.write_shard(1, _questions(12, offset=30))
    manifest = ds.manifest()
    assert list(manifest) == ["00000", "00001"] and [s.rows for s in manifest.values()] == [30, 12]
    assert manifest["00000"].extra == {"entry": "a"} and manifest["00000"].bytes > 0
    ds.write_shard(0, _questions(5))  # a re-run of shard 0 replaces it, never appends
    assert ds.num_rows() == 17 and ds.shard_info(0).rows == 5
    assert sum(b.num_rows for b in ds.iter_batches(batch_size=4)) == 17
    ds.delete_shard(1)
    assert list(ds.manifest()) == ["00000"] and ds.read_all().num_rows == 5


def test_has_committed_reads_markers_only_up_to_the_first_committed_shard(root, monkeypatch):
    ds = storage.Dataset(storage.join(root, "questions"), QUESTION_SCHEMA)
    reads: list[str] = []
    info = storage.Dataset._info
    monkeypatch.setattr(
        storage.Dataset, "_info", staticmethod(lambda uri, data: reads.append(uri) or info(uri, data))
    )
    assert not ds.has_committed() and reads == []  # no marker folder
    for shard in range(4):
        ds.write_shard(shard, _questions(3, offset=3 * shard))
    fs, path = storage.filesystem(ds.file_uri(0))
    fs.rm(path)  # shard 0: a marker whose file is gone is not a commit
    reads.clear()
    assert ds.has_committed() and len(reads) == 2  # 00000 (no file), then 00001
    reads.clear()
    assert ds.committed(lambda i: i.rows) == {"00001": 3, "00002": 3, "00003": 3} and len(reads) == 4
    assert ds.committed_names() == list(ds.manifest()) == ["00001", "00002", "00003"] and ds.num_rows() == 9
    assert ds.files() == [ds.file_uri(s) for s in ("00001", "00002", "00003")]
    for shard in (1, 2, 3):
        ds.delete_shard(shard)
    assert not ds.has_committed()


def test_reader_never_sees_a_partial_shard(root):
    """While shards are written, a concurrent reader only ever finds complete Parquet files."""
    ds = storage.Dataset(storage.join(root, "questions"), QUESTION_SCHEMA)
    fs, path = storage.filesystem(ds.uri)
    rows = _questions(400, pad=400)  # ~170 kB per shard: writes take long enough to overlap
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for shard in range(12):
                ds.write_shard(shard, rows)
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen_files = checks = 0
    while not done.is_set() or checks == 0:
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
        # Everything a directory listing shows under a Parquet name is complete... (skipping
        # "."/"_"-prefixed names as pyarrow and datasets do: the writer's in-flight temp files
        # are ".tmp-*" and may vanish between the listing and the open.)
        for p in fs.glob(f"{path}/*.parquet"):
            if posixpath.basename(p).startswith((".", "_")):
                continue
            with fs.open(p, "rb") as fh:
                assert pq.ParquetFile(fh).metadata.num_rows == 400
            seen_files += 1
        # ...and every shard the manifest lists reads back with the manifest's row count.
        for name, info in ds.manifest().items():
            assert ds.read_shard(name).num_rows == info.rows == 400
        checks += 1
    thread.join()
    assert not errors, errors
    assert checks > 1 and seen_files > 0
    assert ds.num_rows() == 12 * 400


def test_outputs_load_with_pyarrow_dataset_and_hf_datasets(root, tmp_path):
    import datasets

    ds = storage.Dataset(storage.join(root, "questions"), QUESTION_SCHEMA)
    ds.write_shard(0, _questions(25))
    ds.write_shard(1, _questions(15, offset=25))
    fs, path = storage.filesystem(ds.uri)
    # The folder as a whole: _manifest/ and temp files are ignored by pyarrow's discovery.
    table = pads.dataset(path, format="parquet", filesystem=fs).to_table()
    assert (
        table.num_rows == 40 and table.schema.field("options").type == QUESTION_SCHEMA.field("options").type
    )
    # The committed files the manifest lists.
    files = [storage.filesystem(u)[1] for u in ds.files()]
    assert pads.dataset(files, format="parquet", filesystem=fs).count_rows() == 40
    # Hugging Face datasets, with a copy of the storage options (load_dataset mutates them).
    options = storage.storage_options(ds.uri)
    hf = datasets.load_dataset(
        "parquet",
        data_files=ds.files(),
        split="train",
        storage_options=dict(options),
        cache_dir=str(tmp_path / "hf_cache"),
    )
    assert hf.num_rows == 40 and set(QUESTION_SCHEMA.names) <= set(hf.column_names)
    assert sorted(hf["record_index"]) == list(range(40))
    assert "hf" not in options


def test_write_shard_casts_tables_to_the_schema(root):
    ds = storage.Dataset(storage.join(root, "questions"), QUESTION_SCHEMA)
    table = pa.Table.from_pylist(_questions(3)).select(list(reversed(QUESTION_SCHEMA.names)))
    ds.write_shard("extra-00000", table)
    assert ds.read_shard("extra-00000").schema.names == QUESTION_SCHEMA.names


def test_ingest_to_s3_with_images(shared_data, s3_bucket):
    out = f"{s3_bucket}/runs/vqa"
    result = ingest(
        "vqa_rad",
        str(shared_data / "vqa_rad/testset.json"),
        out,
        images=str(shared_data / "vqa_rad/images"),
        shard_size=20,
    )
    assert result.questions == 36 and result.quarantined == 415 and result.shards == ["00000", "00001"]
    ds = storage.Dataset(result.questions_uri, QUESTION_SCHEMA)
    assert ds.num_rows() == 36
    uris = {im["uri"] for row in ds.read_all(["images"]).to_pylist() for im in row["images"]}
    assert len(uris) == 12 and all(u.startswith(f"{s3_bucket}/runs/vqa/images/") for u in uris)
    assert all(storage.read_bytes(u)[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)
    assert storage.read_json(storage.join(out, "ingest.json"))["questions"] == 36
    # A second run finds every image already stored and writes none.
    again = ingest(
        "vqa_rad", str(shared_data / "vqa_rad/testset.json"), out, images=str(shared_data / "vqa_rad/images")
    )
    assert again.images_stored == 0 and ds.num_rows() == 36 and again.shards == ["00000"]


def test_missing_bucket_is_one_clear_error(shared_data, s3_endpoint):
    with pytest.raises(StorageError) as err:
        ingest(
            "medqa", str(shared_data / "medqa/phrases_no_exclude_test.jsonl"), "s3://no-such-bucket-here/run"
        )
    assert "does not exist" in str(err.value) and "\n" not in str(err.value)


def test_a_temp_file_scan_holds_only_the_temp_files(tmp_path) -> None:
    """A 10,000-entry folder's scan for dead writers' temp files keeps only those, not a list of
    every entry (at 10,000 shards a state folder has 30,000, and shard threads may scan at once)."""
    import tracemalloc

    from octomed_data.storage.files import clean_temp_files

    for i in range(10_000):
        (tmp_path / f"{i:05d}.json").write_text("{}")
    (tmp_path / ".00001.json.dead.tmp").write_text("{}")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        removed = clean_temp_files(str(tmp_path), when_due=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert removed == [] and (tmp_path / ".00001.json.dead.tmp").exists()  # a fresh one: not dead yet
    assert peak < 500_000, peak


def test_wrap_tries_again_on_server_errors_only(monkeypatch) -> None:
    """A store's 500/503 answers are tried again after a pause (bounded); anything else (a refused
    connection, a missing object) fails at once, as one StorageError line."""
    from octomed_data.storage import files as files_module

    monkeypatch.setattr(files_module, "SERVER_ERROR_PAUSES_S", (0.01, 0.01))
    calls: list[int] = []

    def flaky(fails: int, exc: Exception):
        def call() -> str:
            calls.append(1)
            if len(calls) <= fails:
                raise exc
            return "ok"

        return call

    assert storage.wrap("s3://b/k", flaky(2, OSError(121, "Internal Server Error"))) == "ok"
    assert len(calls) == 3
    for fails, exc, tries in (
        (3, OSError(121, "Internal Server Error"), 3),  # the pauses are used up
        (1, OSError("Could not connect to the endpoint URL"), 1),
        (1, FileNotFoundError("k"), 1),
        (1, OSError(16, "Please reduce your request rate. SlowDown"), 2),  # S3's 503, then ok
    ):
        calls.clear()
        if tries > fails:
            assert storage.wrap("s3://b/k", flaky(fails, exc)) == "ok"
        else:
            with pytest.raises(StorageError) as err:
                storage.wrap("s3://b/k", flaky(fails, exc))
            assert "\n" not in str(err.value) and "s3://b/k" in str(err.value)
        assert len(calls) == tries, (exc, calls)


def test_a_burst_of_500s_longer_than_botocores_own_retries_is_ridden_out(s3_bucket, monkeypatch) -> None:
    """moto's listing races a delete anywhere in its bucket and answers 500 (real S3 can answer
    500/503 too): a burst longer than botocore's 4 quick attempts no longer fails the listing."""
    import moto.s3.models as moto_models

    from octomed_data.storage import files as files_module

    monkeypatch.setattr(files_module, "SERVER_ERROR_PAUSES_S", (0.05, 0.05))
    folder = f"{s3_bucket}/burst"
    storage.write_bytes(f"{folder}/a.json", b"{}")
    real_list = moto_models.S3Backend.list_objects
    burst = {"left": 6, "failed": 0}

    def list_objects(self, *args, **kwargs):
        if burst["left"] > 0:
            burst["left"] -= 1
            burst["failed"] += 1
            raise KeyError("a key deleted while the bucket was listed")  # moto's own race: a 500
        return real_list(self, *args, **kwargs)

    monkeypatch.setattr(moto_models.S3Backend, "list_objects", list_objects)
    assert storage.list_prefixed(f"{folder}/a") == [f"{folder}/a.json"]
    assert burst["failed"] == 6  # more than botocore alone rides out
    burst["left"] = 10**6  # a store that keeps failing: still one line, after bounded tries
    with pytest.raises(StorageError, match="Internal Server Error"):
        storage.list_prefixed(f"{folder}/a")
    assert 6 < burst["failed"] < 6 + 20
