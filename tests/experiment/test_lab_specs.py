"""Issue 22, the lab's new pieces without a training run: the answer-only / teacher / learning-curve
fields of a spec, and the learning curves and teacher table of the comparison, recomputed here from
prediction rows written by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from octomed_data.errors import ConfigError
from octomed_data.experiment import load_spec
from octomed_data.experiment.compare import compare
from octomed_data.experiment.report import learning_curves_png, report_markdown
from octomed_data.experiment.spec import READY_MADE, parse_spec
from tests.support.compare import REF, SPEC, X
from tests.support.compare import records as _records
from tests.support.compare import write_predictions as _predictions


def test_every_ready_made_spec_loads_and_the_new_ones_say_what_they_compare() -> None:
    assert {"difficulty", "samples_vs_epochs", "teacher"} <= set(READY_MADE)
    specs = {name: load_spec(name) for name in READY_MADE}
    cot = specs["cot"]
    assert cot.arm("direct").export == "answer_only" and cot.arm("direct").evaluation.prompting == "direct"
    assert cot.arm("cot").export == "reasoning" and "imaging_cls_lab" in cot.evaluation.benchmarks
    assert specs["difficulty"].evaluation.every_steps and specs["samples_vs_epochs"].evaluation.every_steps
    teacher = specs["teacher"]
    assert [a.teacher_run for a in teacher.arms] == [t.name for t in teacher.teachers]
    assert {teacher.base_run_of(a) for a in teacher.arms} == {"lab-base-r1-like", "lab-base-gpt4o-like"}
    k16, k1 = specs["samples_vs_epochs"].arms
    assert (k16.samples_per_question, k1.samples_per_question) == (16, 1)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"arms": [{"name": "ref"}, {"name": "x", "teacher_run": "nope"}]},
            "teacher_run 'nope' is not one of",
        ),
        ({"teachers": [{"name": "t", "overrides": {"sources": []}}]}, "may not change the questions"),
        ({"teachers": [{"name": "t"}, {"name": "t"}]}, "duplicate teacher names"),
        ({"arms": [{"name": "ref"}, {"name": "x", "export": "summary"}]}, "export"),
        ({"evaluation": {"every_steps": 0}}, "every_steps"),
    ],
)
def test_bad_new_fields_are_one_error_line(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_spec(SPEC | change)
    assert "\n" not in str(info.value)


def test_the_data_of_an_arm_includes_what_it_trains_on_and_its_teacher() -> None:
    spec = parse_spec(
        SPEC
        | {
            "teachers": [{"name": "t1"}, {"name": "t2", "overrides": {"distill": {"seed": 1}}}],
            "arms": [
                {"name": "ref"},
                {"name": "x", "export": "answer_only"},
                {"name": "y", "teacher_run": "t2"},
            ],
        }
    )
    ref, x, y = spec.arms
    assert ref.selection() != x.selection() and ref.selection()["export"] == "reasoning"
    assert y.selection()["teacher_run"] == "t2"
    assert spec.arm_settings(y)["base_run"] == "b-t2" and spec.arm_settings(y)["teacher"]["overrides"]
    assert "teacher" not in spec.arm_settings(ref) and spec.arm_settings(ref)["base_run"] == "b"


def test_learning_curves_and_teacher_table_are_recomputed_from_predictions(tmp_path: Path) -> None:
    spec = parse_spec(SPEC)
    records = _records(tmp_path, REF, X)
    # Two checkpoints of arm x: an early one (all wrong) and the final one (its evaluation).
    early = _predictions(
        str(tmp_path / "early"), {k: [0] * len(v) for k, v in X.items()}, {"medqa": 1, "vqa_rad": 1}
    )
    records["x"]["curve"] = [
        {"step": 1, "examples": 3, "predictions_uri": early, "checkpoint": "c1"},
        {
            "step": 2,
            "examples": 6,
            "predictions_uri": records["x"]["evaluation"]["predictions_uri"],
            "checkpoint": "c",
        },
    ]
    records["x"]["teacher"] = {
        "name": "t2", "run_id": "b-t2", "pass_rate": 0.25, "accepted": 10, "reasoning_chars": 400.0,
        "completion_tokens": 120.0, "cost_usd": 0.4, "simulated": True, "simulated_usd": 0.4,
    }  # fmt: skip
    result = compare(spec, records)
    points = result["learning_curves"]["x"]
    assert "ref" not in result["learning_curves"]
    assert [p["step"] for p in points] == [1, 2] and [p["examples"] for p in points] == [3, 6]
    assert points[0]["accuracy"] == 0.0 and points[0]["per_benchmark"] == {"medqa": 0.0, "vqa_rad": 0.0}
    # The final point: X's accuracy by hand (medqa seeds 0/4 and 1/4, vqa_rad 1/2 and 1/2).
    assert points[1]["per_benchmark"] == pytest.approx({"medqa": 0.125, "vqa_rad": 0.5})
    assert points[1]["accuracy"] == pytest.approx((0.125 + 0.5) / 2)
    assert learning_curves_png(result).startswith(b"\x89PNG")
    (teacher,) = result["teachers"]
    assert teacher["arm"] == "x" and teacher["accuracy"] == pytest.approx(points[1]["accuracy"])
    macro = next(r for r in result["accuracy"] if r["arm"] == "x" and r["benchmark"] == "macro")
    assert teacher["delta"] == macro["delta"] and teacher["ci_low"] == macro["ci_low"]
    md = report_markdown(result)
    assert "## Learning curves" in md and "| x | 1 | 3 | 0.0 |" in md
    assert "## Teachers" in md and "| x | t2 | b-t2 | 25.0% | 10 |" in md and "(simulated)" in md
    # No arm with a curve: no learning-curve plot or section.
    plain = compare(spec, _records(tmp_path / "again", REF, X))
    assert learning_curves_png(plain) is None and "Learning curves" not in report_markdown(plain)


def test_the_sft_vs_rl_spec_loads_and_only_its_rl_arm_fingerprints_rl_settings() -> None:
    spec = load_spec("sft_vs_rl")
    sft, rl = spec.arm("sft"), spec.arm("sft_rl")
    assert spec.recipe == "lab" and spec.reference == "sft" and (sft.rl, rl.rl) == (False, True)
    # The same SFT data and training: the arms share one SFT checkpoint (the flow's twin).
    assert sft.selection() == rl.selection() and sft.training == rl.training
    assert rl.rl_trainer and rl.rl_trainer["max_steps"] <= 2
    # An arm without RL fingerprints as before the RL fields existed; the RL arm's settings differ.
    assert "rl" not in spec.arm_settings(sft)["arm"] and spec.arm_settings(rl)["arm"]["rl"] is True
    assert spec.settings_fingerprint(sft) != spec.settings_fingerprint(rl)


@pytest.mark.parametrize(
    "arm, message",
    [
        (
            {"name": "x", "rl": True, "rl_trainer": {"num_generations": 1}},
            "arm 'x': rl_trainer: num_generations: Input should be greater than or equal to 2",
        ),
        ({"name": "x", "rl": True, "rl_trainer": {"max_step": 2}}, "arm 'x': rl_trainer: max_step: Extra"),
        ({"name": "x", "rl_trainer": {"max_steps": 2}}, "arm 'x': rl_trainer is set but rl is not true"),
    ],
)
def test_a_bad_rl_trainer_override_is_one_error_line(arm: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_spec(SPEC | {"arms": [{"name": "ref"}, arm]})
    assert "\n" not in str(info.value)


def test_an_rl_arm_has_no_learning_curve() -> None:
    with pytest.raises(ConfigError, match="an RL arm has no learning curve"):
        parse_spec(
            SPEC | {"arms": [{"name": "ref"}, {"name": "x", "rl": True}], "evaluation": {"every_steps": 1}}
        )
