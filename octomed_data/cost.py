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
    under ``unpriced_teachers``. Samples that came from a Batch API batch (``batch_id`` set) are
    priced at the teacher's batch price (``batch_price_factor`` of the online price) and counted
    in ``batch_samples`` / ``batch_prompt_tokens`` / ``batch_completion_tokens`` as well.
    """
    # (teacher, source) -> [prompt, completion, samples, batch prompt, batch completion, batch samples]
    tokens: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    ds = storage.Dataset(raw, SAMPLE_SCHEMA)
    # Shards written before ``batch_id`` existed come without it: all their samples were online.
    cols = ["teacher", "source", "prompt_tokens", "completion_tokens", "batch_id"]
    for batch in ds.iter_batches(batch_size=8192, columns=cols):
        names = batch.schema.names
        values = [batch.column(k).to_pylist() if k in names else [None] * len(batch) for k in cols]
        for teacher, source, p, c, b in zip(*values, strict=True):
            entry = tokens[(teacher, source)]
            entry[0] += p or 0
            entry[1] += c or 0
            entry[2] += 1
            if b is not None:
                entry[3] += p or 0
                entry[4] += c or 0
                entry[5] += 1
    prices = {t.name: t for t in config.teachers} if config else {}
    rows = []
    per_teacher: dict[str, dict[str, float]] = defaultdict(
        lambda: {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    )
    unpriced = set()
    for (teacher, source), (p, c, n, bp, bc, bn) in sorted(tokens.items()):
        t = prices.get(teacher)
        usd = t.cost_usd(p - bp, c - bc) + t.cost_usd(bp, bc, batch=True) if t else 0.0
        if t is None:
            unpriced.add(teacher)
        rows.append(
            {
                "teacher": teacher,
                "source": source,
                "samples": n,
                "prompt_tokens": p,
                "completion_tokens": c,
                "batch_samples": bn,
                "batch_prompt_tokens": bp,
                "batch_completion_tokens": bc,
                "cost_usd": round(usd, 8),
            }
        )
        agg = per_teacher[teacher]
        agg["prompt_tokens"] += p
        agg["completion_tokens"] += c
        agg["cost_usd"] = round(agg["cost_usd"] + usd, 8)
    return {
        "prices_per_1m": {
            name: {
                "prompt": t.price_prompt_per_1m,
                "completion": t.price_completion_per_1m,
                "batch_factor": t.batch_price_factor,
            }
            for name, t in prices.items()
        },
        "by_teacher_source": rows,
        "by_teacher": dict(per_teacher),
        "total_usd": round(sum(r["cost_usd"] for r in rows), 8),
        "total_prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "total_completion_tokens": sum(r["completion_tokens"] for r in rows),
        "unpriced_teachers": sorted(unpriced),
    }
