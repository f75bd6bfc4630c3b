"""The LLaMA-Factory export with the real LLaMA-Factory 0.9.5, in its own cached venv.

``benchmarks/check_llamafactory.py`` builds the venv once (~2-3 min, then cached under
``~/.cache/octomed-data``), copies ``export/llamafactory`` alone to a fresh folder, runs
LLaMA-Factory's ``get_dataset`` (qwen2_vl template + mm_plugin) over every exported row and one
SFT step on the tiny Qwen2.5-VL. A venv that cannot be built fails this test with one line.
"""

from __future__ import annotations

import pytest

from benchmarks.check_llamafactory import BuildError, check


@pytest.mark.timeout(900)
def test_llamafactory_loads_every_row_and_trains_one_step_from_a_copied_export():
    try:
        result = check(None)
    except BuildError as exc:
        pytest.fail(f"cannot build the LLaMA-Factory venv: {exc}", pytrace=False)
    assert result["ok"], result
    assert result["splits"]["train"]["image_rows"] > 0 and result["splits"]["validation"]["image_rows"] > 0
    assert result["global_step"] == 1


@pytest.mark.timeout(900)
def test_llamafactory_trains_a_text_only_model_on_the_text_only_dataset():
    """Issue 24: a text-only model refuses image input, so LLaMA-Factory gets ``octomed_text_*``
    (text rows, no images column) beside the vision datasets; a tiny text-only Qwen2 (``qwen``
    template) loads every text row of a copied export and trains two steps on it."""
    try:
        result = check(None, text_only=True)
    except BuildError as exc:
        pytest.fail(f"cannot build the LLaMA-Factory venv: {exc}", pytrace=False)
    assert result["ok"], result
    assert result["mode"] == "text"
    for split in ("train", "validation"):
        assert result["splits"][split]["rows"] == result["exported_rows"][split] > 0
        assert result["splits"][split]["image_rows"] == 0 and result["splits"][split]["bad"] == []
    assert result["global_step"] == 2
