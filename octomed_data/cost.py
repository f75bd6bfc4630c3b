"""The cost ledger: prompt and completion tokens per teacher and source, priced from the config."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from octomed_data import storage
from octomed_data.schema import SAMPLE_SCHEMA
from octomed_data.teachers import DistillConfig


def cost_ledger(raw: str, config: DistillConfig | None) -> dict[str, Any]:
    """Tokens and USD per teacher x source, streamed from the raw samples at ``raw``.

    Teachers missing from ``config`` (or no config) are counted with a price of 0 and listed
    under ``unpriced_teachers``.
    """
    tokens: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    ds = storage.Dataset(raw, SAMPLE_SCHEMA)
    cols = ["teacher", "source", "prompt_tokens", "completion_tokens"]
    for batch in ds.iter_batches(batch_size=8192, columns=cols):
        for teacher, source, p, c in zip(*(batch.column(k).to_pylist() for k in cols), strict=True):
            entry = tokens[(teacher, source)]
            entry[0] += p or 0
            entry[1] += c or 0
            entry[2] += 1
    prices = {t.name: t for t in config.teachers} if config else {}
    rows = []
    per_teacher: dict[str, dict[str, float]] = defaultdict(
        lambda: {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    )
    unpriced = set()
    for (teacher, source), (p, c, n) in sorted(tokens.items()):
        t = prices.get(teacher)
        usd = t.cost_usd(p, c) if t else 0.0
        if t is None:
            unpriced.add(teacher)
        rows.append(
            {
                "teacher": teacher,
                "source": source,
                "samples": n,
                "prompt_tokens": p,
                "completion_tokens": c,
                "cost_usd": round(usd, 8),
            }
        )
        agg = per_teacher[teacher]
        agg["prompt_tokens"] += p
        agg["completion_tokens"] += c
        agg["cost_usd"] = round(agg["cost_usd"] + usd, 8)
    return {
        "prices_per_1m": {
            name: {"prompt": t.price_prompt_per_1m, "completion": t.price_completion_per_1m}
            for name, t in prices.items()
        },
        "by_teacher_source": rows,
        "by_teacher": dict(per_teacher),
        "total_usd": round(sum(r["cost_usd"] for r in rows), 8),
        "total_prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "total_completion_tokens": sum(r["completion_tokens"] for r in rows),
        "unpriced_teachers": sorted(unpriced),
    }
