"""The comparison's numbers, recomputed here from prediction rows written by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.experiment.compare import arm_metrics, compare, difference, report_markdown, report_png
from octomed_data.experiment.spec import parse_spec
from octomed_data.schema import PREDICTION_SCHEMA


def _predictions(uri: str, correct: dict[tuple[str, int], list[bool]], tokens: dict[str, int]) -> str:
    rows = []
    for (bench, seed), hits in correct.items():
        for i, ok in enumerate(hits):
            rows.append(
                {
                    "question_id": f"{bench}-{i}",
                    "source": bench,
                    "task_type": "text_mcq" if bench == "medqa" else "open_vqa",
                    "gold_answer": "A",
                    "correct": bool(ok),
                    "reasoning_tokens": tokens[bench],
                    "think_closed": True,
                    "completion_tokens": tokens[bench] + 5,
                    "finish_reason": "stop",
                    "benchmark": bench,
                    "seed": seed,
                }  # fmt: skip
            )
    storage.Dataset(uri, PREDICTION_SCHEMA).write_shard(
        0, pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
    )
    return uri


SPEC = {
    "name": "t",
    "base_run": "b",
    "reference": "ref",
    "training": {"max_steps": 1},
    "arms": [{"name": "ref"}, {"name": "x", "samples_per_question": 1}],
    "expect": [
        {"arm": "x", "metric": "medqa", "direction": "down", "paper": "fewer samples are worse"},
        {"arm": "x", "metric": "length:medqa/vqa_rad", "direction": "up", "paper": "longer on text"},
    ],
}


def test_accuracy_per_seed_mean_std_delta_and_noise_are_recomputed_from_predictions(tmp_path: Path) -> None:
    ref = arm_metrics(
        _predictions(
            str(tmp_path / "ref"),
            {
                ("medqa", 0): [1, 1, 1, 0],
                ("medqa", 1): [1, 1, 0, 0],
                ("vqa_rad", 0): [1, 0],
                ("vqa_rad", 1): [1, 1],
            },
            {"medqa": 300, "vqa_rad": 40},
        )  # fmt: skip
    )
    x = arm_metrics(
        _predictions(
            str(tmp_path / "x"),
            {
                ("medqa", 0): [0, 0, 0, 0],
                ("medqa", 1): [1, 0, 0, 0],
                ("vqa_rad", 0): [1, 0],
                ("vqa_rad", 1): [0, 1],
            },
            {"medqa": 200, "vqa_rad": 50},
        )  # fmt: skip
    )
    medqa = ref["accuracy"]["medqa"]
    assert medqa["per_seed"] == {0: 0.75, 1: 0.5} and medqa["mean"] == pytest.approx(0.625)
    assert medqa["std"] == pytest.approx(math.sqrt(((0.75 - 0.625) ** 2 + (0.5 - 0.625) ** 2) / 1))
    # macro per seed = mean over benchmarks under that seed
    assert ref["accuracy"]["macro"]["per_seed"] == {
        0: pytest.approx((0.75 + 0.5) / 2),
        1: pytest.approx(0.75),
    }
    assert ref["reasoning_tokens"] == {"medqa": 300.0, "vqa_rad": 40.0}
    assert ref["reasoning_tokens_by_task"] == {"open_vqa": 40.0, "text_mcq": 300.0}

    d = difference(x["accuracy"]["medqa"], medqa)
    sd_x = x["accuracy"]["medqa"]["std"]
    assert d["delta"] == pytest.approx(0.125 - 0.625)
    assert d["noise"] == pytest.approx(2 * math.sqrt(sd_x**2 / 2 + medqa["std"] ** 2 / 2))
    assert d["exceeds_noise"] is (abs(d["delta"]) > d["noise"])

    spec = parse_spec(SPEC)
    records = {
        "ref": {"status": "COMPLETED", "metrics": ref, "data": {"fingerprint": "f1", "traces": 10}},
        "x": {"status": "COMPLETED", "metrics": x, "data": {"fingerprint": "f1", "traces": 10}},
    }
    result = compare(spec, records)
    rows = {(r["arm"], r["benchmark"]): r for r in result["accuracy"]}
    assert rows[("x", "medqa")]["delta"] == pytest.approx(d["delta"])
    assert rows[("ref", "medqa")]["delta"] == 0.0
    assert result["same_data"] == [["ref", "x"]]  # same fingerprint: the report says so
    (down, length) = result["expectations"]
    assert down["measured"] == ("down" if d["exceeds_noise"] else "same")
    assert length["value"] == pytest.approx(200 / 50) and length["measured"] == "up" and length["agrees"]
    md = report_markdown(result)
    assert (
        "| x | medqa | 12.5 ± 17.7 | -50.0 | 35.4 | yes |" in md and "identical data" in md and "×4.00" in md
    )
    assert report_png(result)[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_seed_has_no_noise_estimate_and_the_sign_decides() -> None:
    d = difference(
        {"mean": 0.4, "std": None, "per_seed": {0: 0.4}}, {"mean": 0.5, "std": None, "per_seed": {0: 0.5}}
    )
    assert d["delta"] == pytest.approx(-0.1) and d["noise"] is None and d["exceeds_noise"] is None


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
