"""The cost ledger: tokens and USD per teacher x source, from the raw replies, priced from the config."""

from __future__ import annotations

import pytest

from octomed_data import storage
from octomed_data.cost import cost_ledger, cost_line
from octomed_data.schema import SAMPLE_SCHEMA
from octomed_data.teachers import DistillConfig


def _row(teacher: str, source: str, idx: int, p: int | None, c: int | None, failed: bool = False) -> dict:
    return {
        "question_id": f"q{idx}",
        "source": source,
        "task_type": "text_mcq",
        "sample_idx": idx,
        "teacher": teacher,
        "model": "m",
        "prompt_version": "v",
        "params_hash": "h",
        "gold_answer": "A",
        "prompt_tokens": p,
        "completion_tokens": c,
        "reject_reason": "request_failed" if failed else None,
    }


def test_tokens_and_prices_per_teacher_and_source(tmp_path) -> None:
    raw = storage.Dataset(str(tmp_path / "raw"), SAMPLE_SCHEMA)
    raw.write_shard("00000", [_row("r1", "medqa", i, 1000, 3000) for i in range(4)])
    raw.write_shard(
        "00001",
        [
            _row("r1", "pmc", 0, 2000, 0),
            _row("gpt", "pmc", 1, 500, 500),
            _row("gpt", "pmc", 2, None, None, True),
        ],
    )
    config = DistillConfig.parse(
        {
            "teachers": [
                {
                    "name": "r1",
                    "base_url": "http://x/v1",
                    "model": "m",
                    "price_prompt_per_1m": 0.55,
                    "price_completion_per_1m": 2.19,
                },
            ]
        }
    )
    ledger = cost_ledger(raw.uri, config)
    by = {(r["teacher"], r["source"]): r for r in ledger["by_teacher_source"]}
    assert by[("r1", "medqa")]["prompt_tokens"] == 4000 and by[("r1", "medqa")]["completion_tokens"] == 12000
    assert by[("r1", "medqa")]["cost_usd"] == pytest.approx((4000 * 0.55 + 12000 * 2.19) / 1e6)
    # A failed request costs nothing but is counted as a sample row; an unknown teacher is unpriced.
    assert by[("gpt", "pmc")]["samples"] == 2 and by[("gpt", "pmc")]["prompt_tokens"] == 500
    assert ledger["unpriced_teachers"] == ["gpt"] and by[("gpt", "pmc")]["cost_usd"] == 0.0
    assert ledger["total_prompt_tokens"] == 6500 and ledger["total_completion_tokens"] == 12500
    assert ledger["total_usd"] == pytest.approx((6000 * 0.55 + 12000 * 2.19) / 1e6)
    assert ledger["by_teacher"]["r1"]["prompt_tokens"] == 6000


def test_empty_run_costs_nothing(tmp_path) -> None:
    ledger = cost_ledger(str(tmp_path / "nothing"), None)
    assert (
        ledger["total_usd"] == 0 and ledger["by_teacher_source"] == [] and ledger["unpriced_teachers"] == []
    )


def _sandbox_config(**prices: float) -> DistillConfig:
    teacher = {"name": "r1", "base_url": "http://127.0.0.1:8000/v1", "model": "m", "mode": "batch", **prices}
    return DistillConfig.parse({"teachers": [teacher]})


def test_sandbox_replies_cost_the_configured_prices_marked_simulated(tmp_path) -> None:
    """Sandbox rows say teacher=sandbox whatever the config calls the teacher: they are priced at
    the prices of the teacher that asked (same model and sampling parameters) and marked simulated."""
    config = _sandbox_config(price_prompt_per_1m=0.55, price_completion_per_1m=2.19)
    h = config.teachers[0].params_hash()
    rows = [dict(_row("sandbox", "medqa", i, 1000, 3000), params_hash=h) for i in range(4)]
    rows[0]["batch_id"] = "batch_1"
    raw = storage.Dataset(str(tmp_path / "raw"), SAMPLE_SCHEMA)
    raw.write_shard("00000", rows)
    ledger = cost_ledger(raw.uri, config)
    online = (4000 * 0.55 + 12000 * 2.19) / 1e6
    usd = online - (1000 * 0.55 + 3000 * 2.19) / 1e6 * 0.5  # one sample at the batch price
    assert ledger["total_usd"] == pytest.approx(usd) and ledger["total_usd"] > 0
    assert ledger["simulated"] is True and ledger["simulated_usd"] == pytest.approx(usd)
    assert "simulated" in ledger["cost_note"] and ledger["unpriced_teachers"] == []
    (row,) = ledger["by_teacher_source"]
    assert row["simulated"] is True and row["priced_as"] == ["r1"] and row["teacher"] == "sandbox"
    assert ledger["total_online_usd"] == pytest.approx(online)
    assert ledger["batch_share"] == 0.25 and ledger["batch_saving"] == pytest.approx(
        1 - usd / online, abs=1e-4
    )
    assert ledger["by_teacher"]["sandbox"]["simulated"] is True
    line = cost_line(ledger)
    assert line.startswith("SIMULATED USD ") and "batch 25% of samples" in line and "not a bill" in line
    # A real teacher's rows are a bill: nothing says simulated.
    real = [dict(_row("r1", "medqa", i, 1000, 3000), params_hash=h) for i in range(4)]
    raw2 = storage.Dataset(str(tmp_path / "raw2"), SAMPLE_SCHEMA)
    raw2.write_shard("00000", real)
    bill = cost_ledger(raw2.uri, config)
    assert (
        bill["simulated"] is False and "cost_note" not in bill and bill["total_usd"] == pytest.approx(online)
    )
    assert cost_line(bill) == f"USD {online:.4f}"


def test_the_demo_and_lab_recipes_price_their_teacher() -> None:
    """The demo and the lab run on the sandbox teacher; their recipe's prices are what its
    replies are priced at (simulated), so the report can compare costs."""
    from octomed_data.recipe import load_recipe

    for name in ("demo", "lab"):
        (teacher,) = load_recipe(name).teachers
        assert teacher.price_prompt_per_1m > 0 and teacher.price_completion_per_1m > 0


def test_sandbox_replies_with_no_prices_are_simulated_and_say_so(tmp_path) -> None:
    config = _sandbox_config()  # no prices
    h = config.teachers[0].params_hash()
    raw = storage.Dataset(str(tmp_path / "raw"), SAMPLE_SCHEMA)
    raw.write_shard("00000", [dict(_row("sandbox", "medqa", i, 100, 300), params_hash=h) for i in range(2)])
    ledger = cost_ledger(raw.uri, config)
    assert ledger["total_usd"] == 0 and ledger["simulated"] is True and "no prices" in ledger["cost_note"]
    assert "with no prices configured" in cost_line(ledger)
