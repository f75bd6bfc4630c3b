"""The cost ledger: prompt and completion tokens per teacher and source, priced from the config."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from octomed_data import storage
from octomed_data.schema import SAMPLE_SCHEMA
from octomed_data.teachers import DistillConfig, TeacherConfig, is_simulated

SIMULATED_NOTE = "simulated: sandbox teacher replies (not model traces) priced at the configured prices"
UNPRICED_SANDBOX_NOTE = "simulated: sandbox teacher replies (not model traces); no prices configured for them"


def _price_for(
    teacher: str, model: str | None, params_hash: str | None, config: DistillConfig | None
) -> TeacherConfig | None:
    """The configured teacher whose prices a row's tokens cost: by name; for sandbox rows (labelled
    ``sandbox`` whatever the config calls the teacher) the teacher that asked for them, found by
    model and sampling parameters, else a teacher named ``sandbox``."""
    if config is None:
        return None
    if not is_simulated(teacher):
        return next((t for t in config.teachers if t.name == teacher), None)
    same = [t for t in config.teachers if t.model == model and t.params_hash() == params_hash]
    same = same or [t for t in config.teachers if t.model == model]
    prices = {(t.price_prompt_per_1m, t.price_completion_per_1m, t.batch_price_factor) for t in same}
    if len(prices) == 1:  # one teacher (or several at the same prices) asked for these replies
        return same[0]
    return next((t for t in config.teachers if is_simulated(t)), None)


def cost_ledger(raw: str, config: DistillConfig | None) -> dict[str, Any]:
    """Tokens and USD per teacher x source, streamed from the raw samples at ``raw``.

    Teachers missing from ``config`` (or no config) are counted with a price of 0 and listed
    under ``unpriced_teachers``. Samples that came from a Batch API batch (``batch_id`` set) are
    priced at the teacher's batch price (``batch_price_factor`` of the online price) and counted
    in ``batch_samples`` / ``batch_prompt_tokens`` / ``batch_completion_tokens`` as well;
    ``batch_share`` is the share of samples that came from batches, ``online_usd`` what the same
    tokens cost at the online price and ``batch_saving`` 1 - ``cost_usd`` / ``online_usd``.

    Sandbox replies (rows labelled ``sandbox``) are priced at the configured prices of the teacher
    that asked for them and marked ``simulated``: a row per teacher x source, ``simulated_usd``,
    and ``simulated: true`` with ``cost_note`` at the top, so no one takes them for a bill.
    """
    # (teacher, source, model, params) -> [prompt, completion, samples, batch prompt, batch completion,
    # batch samples]
    tokens: dict[tuple[str, str, str | None, str | None], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    ds = storage.Dataset(raw, SAMPLE_SCHEMA)
    # Shards written before ``batch_id`` existed come without it: all their samples were online.
    cols = ["teacher", "source", "model", "params_hash", "prompt_tokens", "completion_tokens", "batch_id"]
    for batch in ds.iter_batches(batch_size=8192, columns=cols):
        names = batch.schema.names
        values = [batch.column(k).to_pylist() if k in names else [None] * len(batch) for k in cols]
        for teacher, source, model, params, p, c, b in zip(*values, strict=True):
            # Only sandbox rows need model and parameters (to find the teacher that asked).
            sandbox = is_simulated(teacher)
            entry = tokens[(teacher, source, model if sandbox else None, params if sandbox else None)]
            entry[0] += p or 0
            entry[1] += c or 0
            entry[2] += 1
            if b is not None:
                entry[3] += p or 0
                entry[4] += c or 0
                entry[5] += 1
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    unpriced = set()
    for (teacher, source, model, params), (p, c, n, bp, bc, bn) in tokens.items():
        t = _price_for(teacher, model, params, config)
        if t is None:
            unpriced.add(teacher)
        usd = t.cost_usd(p - bp, c - bc) + t.cost_usd(bp, bc, batch=True) if t else 0.0
        online = t.cost_usd(p, c) if t else 0.0
        row = merged.setdefault(
            (teacher, source),
            {
                "teacher": teacher,
                "source": source,
                "samples": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "batch_samples": 0,
                "batch_prompt_tokens": 0,
                "batch_completion_tokens": 0,
                "cost_usd": 0.0,
                "online_usd": 0.0,
            },
        )
        for k, v in (
            ("samples", n),
            ("prompt_tokens", p),
            ("completion_tokens", c),
            ("batch_samples", bn),
            ("batch_prompt_tokens", bp),
            ("batch_completion_tokens", bc),
            ("cost_usd", usd),
            ("online_usd", online),
        ):
            row[k] += v
        if is_simulated(teacher) and t is not None:
            row["simulated"] = True
            row["priced_as"] = sorted({*row.get("priced_as", []), t.name})
    rows = []
    per_teacher: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "samples": 0,
            "batch_samples": 0,
            "cost_usd": 0.0,
            "online_usd": 0.0,
        }
    )
    for _, row in sorted(merged.items()):
        row["cost_usd"] = round(row["cost_usd"], 8)
        row["online_usd"] = round(row["online_usd"], 8)
        rows.append(row)
        agg = per_teacher[row["teacher"]]
        for k in ("prompt_tokens", "completion_tokens", "samples", "batch_samples"):
            agg[k] += row[k]
        agg["cost_usd"] = round(agg["cost_usd"] + row["cost_usd"], 8)
        agg["online_usd"] = round(agg["online_usd"] + row["online_usd"], 8)
        if row.get("simulated"):
            agg["simulated"] = True
    for agg in per_teacher.values():
        agg["batch_share"] = round(agg["batch_samples"] / agg["samples"], 4) if agg["samples"] else 0.0
        agg["batch_saving"] = _saving(agg["cost_usd"], agg["online_usd"])
    total = round(sum(r["cost_usd"] for r in rows), 8)
    online_total = round(sum(r["online_usd"] for r in rows), 8)
    samples = sum(r["samples"] for r in rows)
    simulated_usd = round(sum(r["cost_usd"] for r in rows if r.get("simulated")), 8)
    simulated = any(r.get("simulated") for r in rows)
    ledger: dict[str, Any] = {
        "prices_per_1m": {
            t.name: {
                "prompt": t.price_prompt_per_1m,
                "completion": t.price_completion_per_1m,
                "batch_factor": t.batch_price_factor,
            }
            for t in (config.teachers if config else [])
        },
        "by_teacher_source": rows,
        "by_teacher": dict(per_teacher),
        "total_usd": total,
        "total_prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "total_completion_tokens": sum(r["completion_tokens"] for r in rows),
        "total_online_usd": online_total,
        "batch_share": round(sum(r["batch_samples"] for r in rows) / samples, 4) if samples else 0.0,
        "batch_saving": _saving(total, online_total),
        "simulated": simulated,
        "simulated_usd": simulated_usd,
        "unpriced_teachers": sorted(unpriced),
    }
    if simulated:
        ledger["cost_note"] = SIMULATED_NOTE if simulated_usd else UNPRICED_SANDBOX_NOTE
    return ledger


def _saving(usd: float, online_usd: float) -> float:
    """1 - cost / the same tokens at the online price (0 when nothing is priced)."""
    return round(1 - usd / online_usd, 4) if online_usd else 0.0


def cost_line(ledger: dict[str, Any]) -> str:
    """The ledger in one line, e.g. ``USD 1.23 (batch 100% of samples, saving 50% vs online)``;
    ``SIMULATED`` leads when sandbox replies were priced."""
    text = f"USD {ledger['total_usd']:.4f}"
    if ledger.get("batch_share"):
        text += (
            f" (batch {ledger['batch_share']:.0%} of samples, saving {ledger['batch_saving']:.0%} "
            f"vs USD {ledger['total_online_usd']:.4f} online)"
        )
    if ledger.get("simulated"):
        priced = "at the configured prices" if ledger.get("simulated_usd") else "with no prices configured"
        text = f"SIMULATED {text}: sandbox replies {priced}, not a bill"
    if ledger.get("unpriced_teachers"):
        text += f"; unpriced: {', '.join(ledger['unpriced_teachers'])}"
    return text
