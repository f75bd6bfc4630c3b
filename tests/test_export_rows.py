"""Export rows (issues 24-26): no duplicate after answer normalisation, a text-only LLaMA-Factory
dataset, keys refused, images stored once (references by default, a copy on request)."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import pytest
from PIL import Image

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.export import export, load_export
from octomed_data.layout import MixtureFolder
from octomed_data.mixture import MixtureConfig, build_mixture
from octomed_data.schema import MIXTURE_SCHEMA
from tests.support.export import load_config
from tests.support.orchestration import write_inputs

KEY = "sk-live-0123456789abcdefXYZ"


@pytest.fixture
def mixture(shared_data, tmp_path):
    accepted, questions = write_inputs(shared_data, str(tmp_path / "in"), n_text=6, n_image=2)
    return build_mixture(accepted, questions, str(tmp_path / "mix"), MixtureConfig(validation_fraction=0.25))


def _rewrite(mixture, out: str, edit) -> str:
    """A copy of ``mixture`` whose split rows went through ``edit(split, rows) -> rows``."""
    for split in ("train", "validation"):
        rows = storage.Dataset(storage.join(mixture.uri, split)).read_all().to_pylist()
        storage.Dataset(MixtureFolder(out).split(split), MIXTURE_SCHEMA).write_shard(0, edit(split, rows))
    return out


def _duplicates(uri: str) -> int:
    """Rows of an exported split that repeat an earlier row's conversation and images exactly."""
    rows = storage.Dataset(uri).read_all().to_pylist()
    seen = Counter(json.dumps([r["messages"], r.get("images")], sort_keys=True, default=repr) for r in rows)
    return sum(n - 1 for n in seen.values())


def _restated(row: dict, n: int) -> dict:
    """Another reply of the same trace that states the same answer in other words."""
    lines = row["response"].split("\n")
    last = [f"Answer: {row['extracted_answer']}", f"**{row['extracted_answer']}**"][n % 2]
    assert lines[-1] != last
    return row | {"sample_idx": row["sample_idx"] + 100 + n, "response": "\n".join([*lines[:-1], last])}


def test_replies_that_normalise_alike_are_exported_once(mixture, tmp_path):
    restated = Counter()

    def edit(split, rows):
        extra = [_restated(r, i) for i, r in enumerate(rows) if i % 2 == 0]
        restated[split] = len(extra)
        return rows + extra

    mix = _rewrite(mixture, str(tmp_path / "mix-dup"), edit)
    result = export(mix, str(tmp_path / "exp"))
    assert restated["train"] > 0 and restated["validation"] > 0
    assert result.duplicates == dict(restated)  # counted per split, never silently
    assert storage.read_json(str(tmp_path / "exp" / "export.json"))["duplicates"] == dict(restated)
    # every replica was read and normalised (answers count the mixture's rows), then left out
    assert sum(result.answers.values()) == mixture.rows_train + mixture.rows_validation + sum(
        restated.values()
    )
    assert result.answers["replaced"] >= sum(restated.values())
    assert result.rows["llamafactory"] == {"train": mixture.rows_train, "validation": mixture.rows_validation}
    for name, splits in result.datasets.items():
        for split, uri in splits.items():
            assert _duplicates(uri) == 0, (name, split)
    # the plain mixture: nothing normalises alike, nothing is left out
    plain = export(mixture.uri, str(tmp_path / "plain"), formats=["llamafactory"])
    assert plain.duplicates == {"train": 0, "validation": 0} and plain.rows == {
        k: v for k, v in result.rows.items() if k.startswith("llamafactory")
    }
    # the answer-only export keeps exactly the rows of the reasoning export (same traces)
    direct = export(mix, str(tmp_path / "direct"), content="answer_only")
    assert direct.rows == result.rows and direct.duplicates == result.duplicates


def test_a_weights_copies_are_not_duplicates(mixture, tmp_path):
    mix = _rewrite(
        mixture, str(tmp_path / "mix-w"), lambda split, rows: rows + [r | {"copy": 1} for r in rows]
    )
    result = export(mix, str(tmp_path / "exp"), formats=["llamafactory"])
    assert result.duplicates == {"train": 0, "validation": 0}
    assert result.rows["llamafactory"]["train"] == 2 * mixture.rows_train


def test_text_only_llamafactory_dataset_holds_the_text_rows(mixture, tmp_path):
    result = export(mixture.uri, str(tmp_path / "exp"), formats=["llamafactory"])
    info = storage.read_json(str(tmp_path / "exp" / "llamafactory" / "dataset_info.json"))
    for split in ("train", "validation"):
        vision = load_export(result.datasets["llamafactory"][split])
        text = load_export(result.datasets["llamafactory_text"][split])
        assert info[f"octomed_text_{split}"]["script_url"] == f"text/{split}"
        assert "images" not in text.column_names
        text_rows = [r for r in vision if not r["images"]]
        assert 0 < len(text) == len(text_rows) < len(vision)
        assert [r["messages"] for r in text] == [r["messages"] for r in text_rows]


def test_export_refuses_a_row_holding_a_teachers_key(mixture, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("VL_TEACHER_KEY", KEY[::-1])

    def leak(column, value):
        def edit(split, rows):
            if split == "train":
                rows[1] = rows[1] | {column: value(rows[1][column])}
            return rows

        return edit

    clean = export(mixture.uri, str(tmp_path / "clean"))  # no row holds a key: exported
    assert clean.settings["key_scan"] == ["OPENAI_API_KEY"]
    reflected = _rewrite(mixture, str(tmp_path / "m1"), leak("response", lambda r: f"{r}\nmy key is {KEY}"))
    out = str(tmp_path / "exp")
    with pytest.raises(ConfigError) as exc:
        export(reflected, out)
    line = str(exc.value)
    assert "\n" not in line and KEY not in line and KEY[4:12] not in line
    assert "export refused" in line and "column 'response'" in line and "$OPENAI_API_KEY" in line
    assert "part-" in line and "train" in line and "row 1" in line
    export(mixture.uri, out)  # an earlier export in the same folder: refused, it goes too
    with pytest.raises(ConfigError):
        export(reflected, out)
    for sub in ("llamafactory/train", "llamafactory/validation", "trl/vision/train", "trl/text/train"):
        assert storage.Dataset(os.path.join(out, sub)).manifest() == {}, sub  # nothing left written
    assert not any(name.endswith(".json") for _, _, files in os.walk(out) for name in files)
    # a key in a list column (the options), under another teacher's variable
    in_options = _rewrite(
        mixture,
        str(tmp_path / "m2"),
        leak(
            "options",
            lambda opts: [
                o | {"text": f"{o['text']} {KEY[::-1]}"} if i == 0 else o for i, o in enumerate(opts)
            ],
        ),
    )
    export(in_options, str(tmp_path / "not-scanned"), formats=["llamafactory"])  # not a named variable
    with pytest.raises(ConfigError, match=r"column 'options' holds the API key of \$VL_TEACHER_KEY"):
        export(in_options, str(tmp_path / "exp2"), secret_env=["OPENAI_API_KEY", "VL_TEACHER_KEY"])
    monkeypatch.delenv("OPENAI_API_KEY")  # no value to look for: nothing is refused
    assert export(reflected, str(tmp_path / "unset"), formats=["llamafactory"]).rows


def _tree_bytes(root) -> int:
    """Bytes under ``root``, each inode once (hard links share their bytes)."""
    seen, total = set(), 0
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def test_vision_exports_reference_the_run_image_store_by_default(mixture, tmp_path):
    from training.data import image_ref, load_image

    store = tmp_path / "in" / "images"
    stored = {p.name: p.read_bytes() for p in store.iterdir()}
    result = export(mixture.uri, str(tmp_path / "ref"))
    assert result.settings["embed_images"] is False and result.images["trl_referenced"] > 0
    rows = storage.Dataset(result.datasets["trl"]["train"]).read_all().to_pylist()
    refs = [im for r in rows for im in r["images"]]
    assert refs and all(im["bytes"] is None for im in refs)
    for im in refs:  # the run's content-addressed store, by absolute path
        assert os.path.isabs(im["path"]) and os.path.dirname(im["path"]) == str(store)
        assert (
            load_image(image_ref(im)).size
            == Image.open(io.BytesIO(stored[os.path.basename(im["path"])])).size
        )
    assert (
        "referenced"
        in storage.read_json(str(tmp_path / "ref" / "trl" / "dataset_info.json"))["vision"]["images"]
    )
    vision = load_config(tmp_path / "ref" / "trl", "vision", "train")
    decoded = [im for r in vision for im in r["images"]]
    assert len(decoded) == len(refs) and all(isinstance(im, Image.Image) for im in decoded)
    # LLaMA-Factory's relative folder shares the store's files (hard links), so nothing is stored twice
    for row in load_export(result.datasets["llamafactory"]["train"]):
        for path in row["images"]:
            bundled = tmp_path / "ref" / "llamafactory" / path
            assert os.stat(bundled).st_ino == os.stat(store / os.path.basename(path)).st_ino
    # the self-contained copy on request embeds the bytes: the export is bigger by about the images
    embedded = export(mixture.uri, str(tmp_path / "emb"), embed_images=True)
    assert embedded.images["trl_embedded"] == result.images["trl_referenced"]
    assert (
        "embedded"
        in storage.read_json(str(tmp_path / "emb" / "trl" / "dataset_info.json"))["vision"]["images"]
    )
    ref_bytes, emb_bytes = _tree_bytes(tmp_path / "ref" / "trl"), _tree_bytes(tmp_path / "emb" / "trl")
    referenced_images = sum(len(stored[os.path.basename(im["path"])]) for im in refs)
    assert emb_bytes - ref_bytes > 0.5 * referenced_images
    row = next(
        r for r in storage.Dataset(embedded.datasets["trl"]["train"]).read_all().to_pylist() if r["images"]
    )
    assert row["images"][0]["bytes"] == stored[row["images"][0]["path"]]
