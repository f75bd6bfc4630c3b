"""The cost ledger: tokens and USD per teacher x source, from the raw replies, priced from the config."""

from __future__ import annotations

import pytest

from octomed_data import storage
from octomed_data.cost import cost_ledger
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
