"""The release flow on a real filtered run: the recipe's release block or the flow's ``out``, and
the ``release-<run_id>`` artifact on the API."""

from __future__ import annotations

import pytest
from PIL import Image

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.release import load_release
from tests.support.flows import artifact_keys
from tests.support.release import build_run


def test_release_flow_publishes_the_run_and_its_artifact(prefect_harness, tmp_path, monkeypatch):
    from flows.common import RunParams
    from flows.release import release_flow

    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-flow-0123456789")
    paths = build_run(tmp_path / "store", [], decontam=True)
    run = RunParams(run_id=paths.run_id, store=paths.store)
    with pytest.raises(ConfigError, match=r"^release needs an output URI"):
        release_flow(run)  # the run's recipe has release.out unset
    out = str(tmp_path / "published")
    result = release_flow(run, out=out, all_responses=True)
    assert result["rows"] == storage.Dataset(paths.questions).num_rows()
    assert storage.exists(storage.join(out, "README.md")) and result["all_responses"] is True
    assert result["with_images"] is False and result["images"] == 0  # the recipe's default
    assert artifact_keys([f"release-{paths.run_id}"]) == {f"release-{paths.run_id}"}
    # The flow's with_images (a UI form field): the rows' images decode to PIL images.
    pixels = str(tmp_path / "pixels")
    result = release_flow(run, out=pixels, with_images=True)
    assert result["with_images"] is True and result["images"] > 0
    rows = load_release(pixels)
    assert sum(len(r["images"]) for r in rows) == result["images"]
    assert all(isinstance(im, Image.Image) for r in rows for im in r["images"])
