"""Export: LLaMA-Factory sharegpt + TRL conversational, image-token escaping, load_dataset local and s3."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.export import IMAGE_TOKEN, escape_placeholders, export, load_export
from octomed_data.mixture import MixtureConfig, build_mixture
from tests.orchestration_data import write_inputs


@pytest.fixture
def mixture(shared_data, tmp_path):
    accepted, questions = write_inputs(shared_data, str(tmp_path / "in"), n_text=6, n_image=2)
    return build_mixture(accepted, questions, str(tmp_path / "mix"), MixtureConfig(validation_fraction=0.25))


def test_escape_placeholders():
    text, n = escape_placeholders("a <image> b <video><image>")
    assert n == 3 and IMAGE_TOKEN not in text and "<video>" not in text


def test_llamafactory_export_loads_and_counts_match(mixture, tmp_path):
    result = export(mixture.uri, str(tmp_path / "exp"), formats=["llamafactory"])
    ds = load_export(result.datasets["llamafactory"]["train"])
    assert len(ds) == mixture.rows_train
    with_images = 0
    for row in ds:
        system, user, assistant = row["messages"]
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        assert user["content"].count(IMAGE_TOKEN) == len(row["images"])
        assert assistant["content"].count(IMAGE_TOKEN) == 0
        assert assistant["content"].startswith("<think>") and "</think>" in assistant["content"]
        with_images += bool(row["images"])
    assert with_images > 0
    assert result.escaped_placeholders > 0  # the test data carries literal <image> strings


def test_llamafactory_dataset_info_loads_as_llamafactory_does(mixture, tmp_path):
    """dataset_info.json entries load the way LLaMA-Factory's loader resolves them.

    LLaMA-Factory: ``script_url`` -> ``load_dataset(path=dataset_dir/script_url, split=split)``;
    ``file_name`` naming a folder -> every entry of ``os.listdir`` as a data file, which the
    ``_manifest/`` folder of each split breaks, so that form must not be used here.
    """
    import datasets

    result = export(mixture.uri, str(tmp_path / "exp"), formats=["llamafactory"])
    dataset_dir = storage.join(result.uri, "llamafactory")
    info = storage.read_json(storage.join(dataset_dir, "dataset_info.json"))
    assert set(info) == {"octomed_train", "octomed_validation"}
    expected = {"octomed_train": mixture.rows_train, "octomed_validation": mixture.rows_validation}
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt" and "file_name" not in entry
        assert entry["columns"] == {"messages": "messages", "images": "images"}
        loaded = datasets.load_dataset(path=f"{dataset_dir}/{entry['script_url']}", split=entry["split"])
        assert len(loaded) == expected[name]
        assert set(loaded.column_names) >= {"messages", "images"}


def test_trl_export_embeds_images_and_loads_from_s3(mixture, s3_bucket):
    result = export(mixture.uri, f"{s3_bucket}/exp", formats=["trl"])
    ds = load_export(result.datasets["trl"]["train"])
    assert len(ds) == mixture.rows_train
    mm = [r for r in ds if r["images"]]
    assert mm, "multimodal rows expected"
    row = mm[0]
    assert isinstance(row["images"][0], Image.Image)
    parts = row["messages"][1]["content"]
    assert sum(p["type"] == "image" for p in parts) == len(row["images"])
    assert IMAGE_TOKEN not in parts[-1]["text"]
    # the LLaMA-Factory flavour from s3 as well, through the documented storage options
    lf = export(mixture.uri, f"{s3_bucket}/exp2", formats=["llamafactory"])
    import datasets

    uri = lf.datasets["llamafactory"]["validation"]
    loaded = datasets.load_dataset(
        "parquet",
        data_files=storage.Dataset(uri).files(),
        split="train",
        storage_options=storage.storage_options(uri),
    )
    assert len(loaded) == mixture.rows_validation


def test_export_errors(tmp_path, mixture):
    with pytest.raises(StorageError):
        export(str(tmp_path / "missing"), str(tmp_path / "x"))
    with pytest.raises(ConfigError):
        export(mixture.uri, str(tmp_path / "x"), formats=["alpaca"])


def test_embedded_image_is_the_normalised_png(mixture, tmp_path):
    result = export(mixture.uri, str(tmp_path / "e"), formats=["trl"])
    table = storage.Dataset(result.datasets["trl"]["train"]).read_all()
    rows = [r for r in table.to_pylist() if r["images"]]
    img = rows[0]["images"][0]
    assert img["bytes"] == storage.read_bytes(img["path"])
    assert Image.open(io.BytesIO(img["bytes"])).format == "PNG"
