"""Every loader reads ``s3://`` (a real S3 server on loopback) and ``file://`` exactly as a local
path; the CLI and the recipe take such inputs; JSON arrays are streamed, not loaded whole."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest

from cli import main
from octomed_data import storage
from octomed_data.images import ImageStore
from octomed_data.layout import IngestFolder
from octomed_data.recipe import parse_recipe
from octomed_data.schema import QUESTION_SCHEMA
from octomed_data.sources import iter_records
from octomed_data.sources.paths import SourcePath
from octomed_data.sources.readers import iter_json_records
from octomed_data.stages.ingest import ingest_many


def upload(local: Path, uri: str) -> None:
    """Copy a file or a folder tree to ``uri`` through the storage layer."""
    if local.is_file():
        storage.write_bytes(uri, local.read_bytes())
        return
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes(f"{uri}/{f.relative_to(local).as_posix()}", f.read_bytes())


def records(fmt: str, path: str, **kw) -> list[tuple[str, dict]]:
    kw.setdefault("image_store", ImageStore(None))
    return list(iter_records(fmt, path, **kw))


def same_rows(
    local: list[tuple[str, dict]], remote: list[tuple[str, dict]], local_root: str, remote_root: str
):
    """Identical records, ids included; only ``input_file`` differs, by the root it was read from."""
    assert len(local) == len(remote) and local
    for (k1, a), (k2, b) in zip(local, remote, strict=True):
        assert k1 == k2
        assert b["input_file"] == a["input_file"].replace(local_root, remote_root, 1)
        assert {k: v for k, v in a.items() if k != "input_file"} == {
            k: v for k, v in b.items() if k != "input_file"
        }


# (format, input below shared/data, --images below it, extra upload)
CASES = [
    ("medqa", "medqa/phrases_no_exclude_test.jsonl", None),  # JSON Lines
    ("mmlu_pro", "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json", None),  # one JSON array
    ("pubmedqa", "pubmedqa", None),  # a folder: object keyed by PMID + the ground-truth split list
    ("mmlu", "mmlu_medical", None),  # a folder of CSVs
    ("vqa_rad", "vqa_rad/testset.json", "vqa_rad/images"),  # images resolved on the same store
]


@pytest.mark.parametrize("fmt,rel,images", CASES, ids=[c[0] for c in CASES])
def test_same_input_from_s3_and_local_gives_identical_questions(shared_data, s3_bucket, fmt, rel, images):
    top = rel.split("/")[0]
    upload(shared_data / top, f"{s3_bucket}/data/{top}")
    local_root, remote_root = str(shared_data), f"{s3_bucket}/data"
    kw = {"images_dir": str(shared_data / images)} if images else {}
    local = records(fmt, str(shared_data / rel), **kw)
    kw = {"images_dir": f"{remote_root}/{images}"} if images else {}
    remote = records(fmt, f"{remote_root}/{rel}", **kw)
    same_rows(local, remote, local_root, remote_root)
    if fmt == "vqa_rad":
        assert any(k == "question" and r["images"] for k, r in remote)  # images really read from S3


def test_imaging_class_tree_on_s3(shared_data, tmp_path, s3_bucket):
    """Class folders listed and images read from S3: the same questions as the local tree."""
    tree = tmp_path / "tree"
    for label, files in (
        ("knee", sorted((shared_data / "omnimedvqa/images").glob("*.png"))[:4]),
        ("radiograph", sorted((shared_data / "vqa_rad/images").glob("*.jpg"))[:4]),
    ):
        (tree / label).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, tree / label / f.name)
    upload(tree, f"{s3_bucket}/tree")
    local = records("imaging", str(tree), per_class=3, seed=1)
    remote = records("imaging", f"{s3_bucket}/tree", per_class=3, seed=1)
    same_rows(local, remote, str(tree), f"{s3_bucket}/tree")
    assert sum(k == "question" for k, _ in remote) == 6


def test_file_uri_and_relative_path_read_like_the_absolute_path(shared_data, tmp_path, monkeypatch):
    path = shared_data / "medreason_eval/medbullets_op4.jsonl"
    absolute = records("medbullets", str(path))
    assert records("medbullets", f"file://{path}") == absolute
    monkeypatch.chdir(shared_data)
    assert records("medbullets", "medreason_eval/medbullets_op4.jsonl") == absolute
    assert absolute[0][1]["input_file"] == str(path)  # absolute whatever the working directory


def test_cli_ingests_an_s3_input_like_the_local_file(shared_data, tmp_path, s3_bucket, capsys):
    src = shared_data / "medqa/medqa_test_5opt.jsonl"
    upload(src, f"{s3_bucket}/in/medqa_test_5opt.jsonl")
    assert (
        main(["ingest", "medqa", f"{s3_bucket}/in/medqa_test_5opt.jsonl", "--out", str(tmp_path / "s3")]) == 0
    )
    assert main(["ingest", "medqa", str(src), "--out", f"{s3_bucket}/out-local"]) == 0
    capsys.readouterr()
    from_s3 = storage.Dataset(IngestFolder(str(tmp_path / "s3")).questions, QUESTION_SCHEMA).read_all()
    from_local = storage.Dataset(IngestFolder(f"{s3_bucket}/out-local").questions, QUESTION_SCHEMA).read_all()
    assert from_s3.num_rows == 1273
    assert from_s3.column("question_id").to_pylist() == from_local.column("question_id").to_pylist()
    assert from_s3.drop(["input_file"]).equals(from_local.drop(["input_file"]))


def test_recipe_sources_with_s3_and_hf_entries(shared_data, tmp_path, s3_bucket):
    import datasets

    upload(shared_data / "medreason_eval/medbullets_op4.jsonl", f"{s3_bucket}/src/medbullets_op4.jsonl")
    rows = [
        json.loads(x) for x in (shared_data / "medqa/phrases_no_exclude_test.jsonl").read_text().splitlines()
    ]
    datasets.Dataset.from_list(rows[:30]).save_to_disk(str(tmp_path / "recipe" / "medqa_saved"))
    recipe = parse_recipe(
        {
            "sources": [
                {"format": "medbullets", "input": f"{s3_bucket}/src/medbullets_op4.jsonl"},
                {
                    "format": "hf",
                    "input": "medqa_saved",  # relative to the recipe's folder
                    "name": "medqa_hf",
                    "split": "train",
                    "options": {"mapping": {"base": "medqa", "metadata": []}},
                },
            ]
        },
        base_dir=str(tmp_path / "recipe"),
    )
    entries = recipe.ingest_entries()
    assert entries[1]["input"] == str(tmp_path / "recipe" / "medqa_saved")
    result = ingest_many(entries, str(tmp_path / "out"))
    assert result.per_source["medbullets"]["records"] == 308  # (4 upstream duplicates quarantined)
    assert result.per_source["medqa_hf"] == {"records": 30, "questions": 30, "quarantined": 0}
    # A hub id in a recipe stays an id (it is no file next to the recipe).
    hub = parse_recipe(
        {
            "sources": [
                {"format": "hf", "input": "openlifescienceai/medmcqa", "options": {"mapping": "medmcqa"}}
            ]
        },
        base_dir=str(tmp_path / "recipe"),
    )
    assert hub.ingest_entries()[0]["input"] == "openlifescienceai/medmcqa"


def test_json_arrays_are_streamed_not_loaded_whole(shared_data, tmp_path):
    """Peak memory while reading a ~24 MB JSON array stays far below the file's size."""
    seed = json.loads((shared_data / "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json").read_text())
    path = tmp_path / "big_test.json"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("[")
        n = 0
        while fh.tell() < 24 * 2**20:
            for rec in seed:
                fh.write(("," if n else "") + json.dumps(dict(rec, n=n), ensure_ascii=False))
                n += 1
        fh.write("]")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_json_records(SourcePath.of(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < size / 10, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB array"


def test_streamed_array_errors_and_chunk_boundaries(tmp_path):
    from octomed_data.errors import SourceError
    from octomed_data.sources.readers import JsonStream

    # Numbers, strings and escapes split across tiny chunks decode exactly as json.loads does.
    doc = [12345, -0.5e3, 'a\u00e9"b\\', {"k": [1, 2, {"x": None}]}, True, "é" * 5]
    path = tmp_path / "edge.json"
    path.write_text(json.dumps(doc, ensure_ascii=False))
    with open(path, "rb") as fh:
        stream = JsonStream(fh, str(path), chunk_size=3)
        assert [v for _, v in stream.walk()] == doc
    broken = tmp_path / "broken.json"
    broken.write_text('[{"a": 1}, {"a": 2}\n, {"a": ')
    with pytest.raises(SourceError, match="is not valid JSON: .* at line 2"):
        list(iter_json_records(SourcePath.of(broken)))
