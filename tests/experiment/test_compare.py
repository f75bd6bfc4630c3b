"""The comparison's numbers, recomputed here from prediction rows written by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from octomed_data.errors import ConfigError
from octomed_data.experiment.compare import compare, paired_bootstrap
from octomed_data.experiment.report import report_markdown, report_png
from octomed_data.experiment.spec import parse_spec
from tests.support.compare import REF, SPEC, X
from tests.support.compare import records as _records


def _matrix(cells: dict, bench: str) -> np.ndarray:
    """items x seeds, built here from the rows written above."""
    seeds = sorted(s for b, s in cells if b == bench)
    return np.array([cells[(bench, s)] for s in seeds], dtype=float).T


def test_accuracy_deltas_intervals_and_groups_are_recomputed_from_predictions(tmp_path: Path) -> None:
    records = _records(tmp_path, REF, X)
    ref = records["ref"]["metrics"]
    medqa = ref["accuracy"]["medqa"]
    assert medqa["per_seed"] == {0: 0.75, 1: 0.5} and medqa["mean"] == pytest.approx(0.625)
    assert medqa["std"] == pytest.approx(math.sqrt(((0.75 - 0.625) ** 2 + (0.5 - 0.625) ** 2) / 1))
    # macro per seed = mean over benchmarks under that seed
    assert ref["accuracy"]["macro"]["per_seed"] == {
        0: pytest.approx((0.75 + 0.5) / 2),
        1: pytest.approx(0.75),
    }
    assert ref["reasoning_tokens"] == {"medqa": 300.0, "vqa_rad": 40.0}
    assert ref["reasoning_tokens_by_task"] == {"text_mcq": 300.0, "yes_no_maybe": 40.0}

    spec = parse_spec(SPEC)
    result = compare(spec, records)
    rows = {(r["arm"], r["benchmark"]): r for r in result["accuracy"]}
    # Δ and its interval: the paired bootstrap over the (item, seed) differences built here.
    d_medqa = _matrix(X, "medqa") - _matrix(REF, "medqa")
    d_vqa = _matrix(X, "vqa_rad") - _matrix(REF, "vqa_rad")
    for bench, diffs in (("medqa", [d_medqa]), ("vqa_rad", [d_vqa]), ("macro", [d_medqa, d_vqa])):
        expected = paired_bootstrap(diffs)
        row = rows[("x", bench)]
        assert row["delta"] == pytest.approx(np.mean([d.mean() for d in diffs]))
        assert (row["ci_low"], row["ci_high"]) == (expected["ci_low"], expected["ci_high"])
        assert row["ci_low"] <= row["delta"] <= row["ci_high"]
        assert row["beyond_noise"] is (row["ci_low"] > 0 or row["ci_high"] < 0)
    assert rows[("x", "medqa")]["delta"] == pytest.approx(0.125 - 0.625)
    assert rows[("ref", "medqa")]["delta"] == 0.0
    # Deterministic: the same predictions give the same intervals.
    assert compare(spec, records)["accuracy"] == result["accuracy"]
    # Per task group, by image presence: VQA-RAD yes/no (task type yes_no_maybe) is multimodal.
    groups = {(g["arm"], g["group"]): g for g in result["groups"]}
    assert set(groups) == {("ref", "text"), ("ref", "multimodal"), ("x", "text"), ("x", "multimodal")}
    assert groups[("ref", "text")]["mean"] == pytest.approx(_matrix(REF, "medqa").mean())
    assert groups[("x", "multimodal")]["mean"] == pytest.approx(_matrix(X, "vqa_rad").mean())
    assert groups[("x", "text")]["delta"] == pytest.approx(d_medqa.mean())
    assert groups[("x", "multimodal")]["ci_low"] == paired_bootstrap([d_vqa])["ci_low"]
    assert result["statistics"]["groups_by"] == {"ref": "image", "x": "image"}
    assert result["same_data"] == [["ref", "x"]]  # same fingerprint: the report says so
    assert result["shared_checkpoints"] == [["ref", "x"]]
    (down, length) = result["expectations"]
    assert down["measured"] == ("down" if rows[("x", "medqa")]["beyond_noise"] else "same")
    assert length["value"] == pytest.approx(200 / 50) and length["measured"] == "up" and length["agrees"]
    md = report_markdown(result)
    r = rows[("x", "medqa")]
    ci = f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
    assert f"| x | medqa | 12.5 ± 17.7 | -50.0 | {ci} |" in md
    assert "identical data" in md and "sharing one checkpoint" in md and "×4.00" in md
    assert "| x | multimodal |" in md and "Fig. 1" in md
    assert report_png(result)[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_flipped_item_of_four_with_no_seed_variance_is_not_beyond_noise(tmp_path: Path) -> None:
    """The seed-only noise bound called this 'beyond noise' (std 0 on both arms)."""
    ref = {
        ("medqa", 0): [1, 1, 0, 0],
        ("medqa", 1): [1, 1, 0, 0],
        ("vqa_rad", 0): [1, 1],
        ("vqa_rad", 1): [1, 1],
    }
    x = {
        ("medqa", 0): [1, 1, 1, 0],
        ("medqa", 1): [1, 1, 1, 0],
        ("vqa_rad", 0): [1, 1],
        ("vqa_rad", 1): [1, 1],
    }
    records = _records(tmp_path, ref, x)
    assert records["x"]["metrics"]["accuracy"]["medqa"]["std"] == 0.0
    row = next(
        r
        for r in compare(parse_spec(SPEC), records)["accuracy"]
        if r["arm"] == "x" and r["benchmark"] == "medqa"
    )
    assert row["delta"] == pytest.approx(0.25)
    assert row["ci_low"] == 0.0 and row["beyond_noise"] is False
    # Many items that all flip the same way are beyond noise.
    many = paired_bootstrap([np.ones((40, 2)) - np.vstack([np.ones((10, 2)), np.zeros((30, 2))])])
    assert many["ci_low"] > 0 and many["beyond_noise"] is True


@pytest.mark.parametrize(
    "change, message",
    [
        ({"reference": "nope"}, "reference arm 'nope' is not one of the arms"),
        ({"arms": [{"name": "a"}, {"name": "a"}]}, "duplicate arm names"),
        ({"training": {}}, "same_steps needs training.max_steps"),
        ({"arms": [{"name": "ref", "pass_rate": [0.8, 0.2]}, {"name": "x"}]}, "pass_rate must be"),
        ({"arms": [{"name": "ref", "samples_per_question": 0}, {"name": "x"}]}, "samples_per_question"),
        ({"expect": [{"arm": "zz", "direction": "up", "paper": "p"}]}, "expect: unknown arm 'zz'"),
        ({"colour": "red"}, "colour"),
        (
            {"arms": [{"name": "ref", "pass_rate": [0.0, 0.5]}, {"name": "x", "pass_rate": [0.4, 1.0]}]},
            r"pass_rate bands of arms 'ref' \[0.0, 0.5\] and 'x' \[0.4, 1.0\] overlap",
        ),
        (
            {"arms": [{"name": "ref", "pass_rate": [0.0, 1.0]}, {"name": "x", "pass_rate": [1.0, 1.0]}]},
            "overlap",
        ),
        ({"arms": [{"name": "ref", "k_mode": "first_k"}, {"name": "x"}]}, "k_mode"),
    ],
)
def test_a_bad_spec_is_one_line(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_spec(SPEC | change)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["sources", "samples", "length", "cot"])
def test_the_ready_made_specs_load_and_name_the_lab_recipe(name: str) -> None:
    from octomed_data.experiment import load_spec
    from octomed_data.recipe import load_recipe

    spec = load_spec(name)
    assert spec.name == name and spec.recipe == "lab" and len(spec.arms) >= 2 and spec.expect
    load_recipe(spec.recipe)  # the embedded lab recipe validates
    if name == "samples":
        assert [a.samples_per_question for a in spec.arms] == [1, 4, 16, 1]


def test_a_missing_spec_is_one_line() -> None:
    from octomed_data.experiment import load_spec

    with pytest.raises(ConfigError, match="experiment spec not found: nope.yaml"):
        load_spec("nope.yaml")


def test_half_open_bands_and_the_ready_made_length_spec_do_not_overlap() -> None:
    from octomed_data.experiment import load_spec
    from octomed_data.experiment.spec import band_contains

    adjacent = {"arms": [{"name": "ref", "pass_rate": [0.0, 0.5]}, {"name": "x", "pass_rate": [0.5, 1.0]}]}
    parse_spec(SPEC | adjacent)  # [0, 0.5) and [0.5, 1.0]: no question in both
    assert band_contains((0.0, 0.5), 0.0) and not band_contains((0.0, 0.5), 0.5)
    assert band_contains((0.5, 1.0), 0.5) and band_contains((0.5, 1.0), 1.0)  # the top band holds 1.0
    assert band_contains((0.0, 0.0), 0.0) and not band_contains((0.0, 0.0), 0.1)
    overlapping = {"arms": [{"name": "ref", "pass_rate": [0.0, 0.6]}, {"name": "x", "pass_rate": [0.5, 1.0]}]}
    assert parse_spec(SPEC | overlapping | {"allow_overlap": True}).allow_overlap  # allowed explicitly
    bands = [a.pass_rate for a in load_spec("length").arms if a.pass_rate is not None]
    assert bands == [(0.0, 0.5), (0.5, 1.0)]


def test_k_mode_is_part_of_the_selection_and_the_settings_fingerprint() -> None:
    spec = parse_spec(SPEC | {"arms": [{"name": "ref"}, {"name": "x", "samples_per_question": 4}]})
    drawn = spec.arm("x")
    accepted = drawn.model_copy(update={"k_mode": "first_k_accepted"})
    assert drawn.k_mode == "first_k_drawn"  # the paper's: k samples drawn per question
    assert (
        drawn.selection()["k_mode"] == "first_k_drawn"
        and accepted.selection()["k_mode"] == "first_k_accepted"
    )
    assert spec.settings_fingerprint(drawn) != spec.settings_fingerprint(accepted)
