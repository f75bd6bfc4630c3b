"""The ``hf`` source: save_to_disk folders, Parquet files, the offline hub cache, S3, mappings.

The datasets are built with the real ``datasets`` library from real benchmark rows (MedMCQA
dev, MedQA test, VQA-RAD images) in the published Hugging Face column layouts; with the source
name of the native loader, the ``hf`` rows must get the native loader's question ids.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import datasets
import pytest

from cli import main
from octomed_data.errors import ConfigError, SourceError
from octomed_data.images import ImageStore
from octomed_data.sources import iter_records


def run(fmt: str, path: str, **kw) -> tuple[list[dict], list[dict]]:
    questions, quarantined = [], []
    for kind, row in iter_records(fmt, path, **kw):
        (questions if kind == "question" else quarantined).append(row)
    return questions, quarantined


def medmcqa_hf_rows(shared_data: Path, n: int) -> list[dict]:
    """MedMCQA dev rows in the HF layout (``cop`` is a 0-based ClassLabel there, 1-based upstream)."""
    rows = [json.loads(line) for line in (shared_data / "medmcqa/dev.json").read_text().splitlines()[:n]]
    return [dict(r, cop=r["cop"] - 1) for r in rows]


def test_save_to_disk_with_ready_mapping_matches_the_native_loader(shared_data, tmp_path):
    folder = tmp_path / "medmcqa_saved"
    datasets.Dataset.from_list(medmcqa_hf_rows(shared_data, 40)).save_to_disk(str(folder))
    hf_rows, hf_bad = run("hf", str(folder), mapping="medmcqa", source="medmcqa", split="validation")
    native, _ = run("medmcqa", str(shared_data / "medmcqa/dev.json"))
    assert hf_bad == [] and len(hf_rows) == 40
    raw = medmcqa_hf_rows(shared_data, 40)
    for a, b, r in zip(hf_rows, native[:40], raw, strict=True):
        assert a["question_id"] == b["question_id"]
        assert (a["answer"], a["options"], a["split"]) == (b["answer"], b["options"], "validation")
        assert json.loads(a["metadata"])["id"] == r["id"] == json.loads(b["metadata"])["id"]
    assert hf_rows[0]["input_file"].endswith("data-00000-of-00001.arrow") and hf_rows[0]["record_index"] == 0


def test_dataset_dict_splits_and_unlabelled_rows(shared_data, tmp_path):
    rows = medmcqa_hf_rows(shared_data, 30)
    test_rows = [dict(r, cop=-1) for r in rows[20:]]  # MedMCQA's test split has no labels
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:20]), "test": datasets.Dataset.from_list(test_rows)}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    questions, quarantined = run("hf", str(tmp_path / "dd"), mapping="medmcqa")
    assert len(questions) == 20 and {q["split"] for q in questions} == {"train"}
    assert len(quarantined) == 10 and {q["reason"] for q in quarantined} == {"missing_answer"}
    only_train, _ = run("hf", str(tmp_path / "dd"), mapping="medmcqa", split="train")
    assert [q["question_id"] for q in only_train] == [q["question_id"] for q in questions]
    with pytest.raises(SourceError, match="no split 'validation'"):
        iter_records("hf", str(tmp_path / "dd"), mapping="medmcqa", split="validation")


def test_parquet_with_ready_and_custom_mapping(shared_data, tmp_path):
    path = shared_data / "medqa/phrases_no_exclude_test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:25]]
    parquet = tmp_path / "test-00000-of-00001.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    hf_rows, bad = run("hf", str(parquet), mapping="medqa", source="medqa")
    native, _ = run("medqa", str(path))
    assert bad == [] and [r["question_id"] for r in hf_rows] == [r["question_id"] for r in native[:25]]
    assert {r["split"] for r in hf_rows} == {"test"}  # from the hub file name
    # A custom layout: a list of choices, a 1-based gold index, renamed columns.
    custom = [
        {
            "stem": r["question"],
            "choices": list(r["options"].values()),
            "gold": "ABCD".index(r["answer_idx"]) + 1,
        }
        for r in rows
    ]
    datasets.Dataset.from_list(custom).to_parquet(str(tmp_path / "custom.parquet"))
    mapping = {"question": "stem", "options": "choices", "answer": "gold", "answer_format": "index1"}
    mine, bad = run("hf", str(tmp_path / "custom.parquet"), mapping=mapping, source="medqa", split="test")
    assert bad == [] and [r["question_id"] for r in mine] == [r["question_id"] for r in native[:25]]
    # The same mapping as JSON text (what --option mapping={...} passes).
    again, _ = run("hf", str(tmp_path / "custom.parquet"), mapping=json.dumps(mapping), source="medqa")
    assert [r["answer"] for r in again] == [r["answer"] for r in mine]
    with pytest.raises(ConfigError, match="no column 'stem2'"):
        iter_records("hf", str(tmp_path / "custom.parquet"), mapping=dict(mapping, question="stem2"))
    with pytest.raises(ConfigError, match="ready mappings"):
        iter_records("hf", str(tmp_path / "custom.parquet"), mapping="medmcqa_v9")


def test_pmc_vqa_layout_with_embedded_images_and_figure_paths(shared_data, tmp_path):
    images = sorted((shared_data / "vqa_rad/images").glob("*.jpg"))[:3]
    base = {
        "Question": "Which imaging modality is shown?",
        "Choice A": "A:CT",
        "Choice B": "B:MRI",
        "Choice C": "C:X-ray",
        "Choice D": "D:PET",
        "Answer_label": "C",
        "Answer": "X-ray",
    }
    # The image bytes embedded, as the hub's parquet files hold them ({bytes, path: file name}).
    rows = [dict(base, Figure_path=p.name, image={"bytes": p.read_bytes(), "path": p.name}) for p in images]
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "train.parquet"))
    store = ImageStore(str(tmp_path / "store"))
    questions, bad = run("hf", str(tmp_path / "train.parquet"), mapping="pmc_vqa", image_store=store)
    assert bad == [] and len(questions) == 3
    assert [o["text"] for o in questions[0]["options"]] == ["CT", "MRI", "X-ray", "PET"]
    assert questions[0]["task_type"] == "mm_mcq" and questions[0]["answer"] == "C"
    stored = {q["images"][0]["sha256"] for q in questions}
    assert len(stored) == 3 and all(Path(q["images"][0]["uri"]).is_file() for q in questions)
    # The CSV-style layout (paths only) resolves Figure_path against --images.
    datasets.Dataset.from_list([dict(base, Figure_path=p.name) for p in images]).to_parquet(
        str(tmp_path / "paths" / "test.parquet")
    )
    by_path, bad = run(
        "hf", str(tmp_path / "paths" / "test.parquet"), mapping="pmc_vqa", images_dir=str(images[0].parent)
    )
    assert bad == [] and {q["images"][0]["sha256"] for q in by_path} == stored
    missing, quarantined = run("hf", str(tmp_path / "paths" / "test.parquet"), mapping="pmc_vqa")
    assert missing == [] and {q["reason"] for q in quarantined} == {"missing_image"}


def test_hub_id_resolved_from_the_local_cache(shared_data, tmp_path, monkeypatch):
    """The cache an online ``load_dataset("openlifescienceai/medmcqa")`` leaves, read offline."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    parquet = tmp_path / "validation.parquet"
    datasets.Dataset.from_list(medmcqa_hf_rows(shared_data, 15)).to_parquet(str(parquet))
    cache = tmp_path / "hf-cache"
    builder = Parquet(
        cache_dir=str(cache), dataset_name="medmcqa", data_files={"validation": str(parquet)}, hash="0" * 16
    )
    builder.download_and_prepare()
    # Laid out as the hub builder names it: <namespace>___<name>/<config>/<version>/<hash>/.
    (cache / "openlifescienceai___medmcqa").mkdir()
    shutil.move(
        glob.glob(str(cache / "medmcqa" / "default-*"))[0], cache / "openlifescienceai___medmcqa" / "default"
    )
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    questions, bad = run("hf", "openlifescienceai/medmcqa", mapping="medmcqa", source="medmcqa")
    native, _ = run("medmcqa", str(shared_data / "medmcqa/dev.json"))
    assert bad == [] and [q["question_id"] for q in questions] == [q["question_id"] for q in native[:15]]
    assert questions[0]["input_file"] == "openlifescienceai/medmcqa:validation"
    assert {q["split"] for q in questions} == {"validation"}


def test_missing_hub_id_offline_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    rc = main(["ingest", "hf", "nobody-here/no-such-dataset", "--option", "mapping=medqa", "--out", "out"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: nobody-here/no-such-dataset: no such path, and not a dataset in the local")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_hf_from_s3_matches_local(shared_data, tmp_path, s3_bucket):
    from octomed_data import storage

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(medmcqa_hf_rows(shared_data, 12)).save_to_disk(str(folder))
    for f in folder.iterdir():
        storage.write_bytes(f"{s3_bucket}/saved/{f.name}", f.read_bytes())
    local, _ = run("hf", str(folder), mapping="medmcqa")
    remote, _ = run("hf", f"{s3_bucket}/saved", mapping="medmcqa")
    strip = [{k: v for k, v in r.items() if k != "input_file"} for r in local]
    assert strip == [{k: v for k, v in r.items() if k != "input_file"} for r in remote] and len(remote) == 12
    assert remote[0]["input_file"] == f"{s3_bucket}/saved/data-00000-of-00001.arrow"


def test_hub_offline_blocks_nest_across_threads() -> None:
    """Review finding: one entry leaving its offline block switched the hub back on while another
    entry was still loading inside its own."""
    import threading

    import datasets
    from huggingface_hub import constants

    from octomed_data.sources.hf import hub_offline

    before = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with hub_offline():
            inside.set()
            leave.wait(5)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(5)
    with hub_offline():
        pass  # this block ends first ...
    assert datasets.config.HF_HUB_OFFLINE and constants.HF_HUB_OFFLINE  # ... the other is still offline
    leave.set()
    t.join()
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == before
