"""The comparison report of an experiment: every number recomputed from the arms' predictions.

Per arm and benchmark: accuracy under each protocol seed, then mean ± sample std over seeds; the
difference to the reference arm and whether it exceeds the seed noise (|Δ| > 2 standard errors of
the difference, ``2·sqrt(sd_a²/n_a + sd_ref²/n_ref)``; with one seed there is no noise estimate).
Also: the traces and tokens each arm trained on, mean reasoning tokens per benchmark and task type
(the paper's length-calibration view: PMC-VQA vs MedXpertQA where present), and the paper's
reported direction of each effect beside the measured one.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from octomed_data import storage

MACRO = "macro"
LENGTH = "length:"  # an expectation on reasoning length within an arm: length:A/B
_COLUMNS = ["benchmark", "task_type", "seed", "correct", "reasoning_tokens"]


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def arm_metrics(predictions_uri: str) -> dict[str, Any]:
    """Accuracy per benchmark per seed (and their mean/std), reasoning tokens per benchmark and task.

    Streamed shard by shard from the evaluation's ``predictions`` dataset.
    """
    ds = storage.Dataset(predictions_uri)
    hits: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    task_tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for shard in sorted(ds.manifest()):
        t = ds.read_shard(shard, _COLUMNS)
        for bench, task, seed, ok, rt in zip(*(t.column(c).to_pylist() for c in _COLUMNS), strict=True):
            cell = hits[bench][int(seed or 0)]
            cell[0] += bool(ok)
            cell[1] += 1
            for acc in (tokens[bench], task_tokens[task]):
                acc[0] += int(rt or 0)
                acc[1] += 1
    benchmarks: dict[str, Any] = {}
    seeds_all: set[int] = set()
    for bench in sorted(hits):
        per_seed = {s: c / n for s, (c, n) in sorted(hits[bench].items()) if n}
        seeds_all |= set(per_seed)
        mean, std = _mean_std(list(per_seed.values()))
        items = max(n for _, n in hits[bench].values())
        benchmarks[bench] = {"per_seed": per_seed, "mean": mean, "std": std, "items": items}
    macro_seeds = {
        s: sum(b["per_seed"][s] for b in benchmarks.values()) / len(benchmarks)
        for s in sorted(seeds_all)
        if all(s in b["per_seed"] for b in benchmarks.values())
    }
    mean, std = _mean_std(list(macro_seeds.values()))
    benchmarks[MACRO] = {"per_seed": macro_seeds, "mean": mean, "std": std, "items": None}
    return {
        "accuracy": benchmarks,
        "reasoning_tokens": {b: round(s / n, 1) for b, (s, n) in sorted(tokens.items()) if n},
        "reasoning_tokens_by_task": {t: round(s / n, 1) for t, (s, n) in sorted(task_tokens.items()) if n},
    }


def difference(arm: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, Any]:
    """Δ of mean accuracy vs the reference, the 2-SE noise bound and whether Δ exceeds it."""
    if arm.get("mean") is None or ref.get("mean") is None:
        return {"delta": None, "noise": None, "exceeds_noise": None}
    delta = arm["mean"] - ref["mean"]
    n_a, n_r = len(arm.get("per_seed") or {}), len(ref.get("per_seed") or {})
    if arm.get("std") is None or ref.get("std") is None or n_a < 2 or n_r < 2:
        return {"delta": delta, "noise": None, "exceeds_noise": None}
    noise = 2 * math.sqrt(arm["std"] ** 2 / n_a + ref["std"] ** 2 / n_r)
    return {"delta": delta, "noise": noise, "exceeds_noise": abs(delta) > noise}


def measured_direction(diff: Mapping[str, Any]) -> str:
    """up / down when Δ exceeds the seed noise, else same; with one seed (no noise estimate) Δ's sign."""
    delta = diff.get("delta")
    if delta is None:
        return "n/a"
    if diff.get("exceeds_noise") is False:
        return "same"
    return "up" if delta > 0 else "down" if delta < 0 else "same"


def compare(spec: Any, records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The whole comparison (JSON-able) from each arm's record (``metrics``, ``data``, ``train``)."""
    ref = records.get(spec.reference, {}).get("metrics", {}).get("accuracy", {})
    benches = sorted(
        {b for r in records.values() for b in r.get("metrics", {}).get("accuracy", {})} - {MACRO}
    )
    rows = []
    for arm in spec.arms:
        rec = records.get(arm.name, {})
        acc = rec.get("metrics", {}).get("accuracy", {})
        for bench in [*benches, MACRO]:
            cell = acc.get(bench, {})
            row = {"arm": arm.name, "benchmark": bench, "mean": cell.get("mean"), "std": cell.get("std")}
            row["seeds"] = len(cell.get("per_seed") or {})
            row |= difference(cell, ref.get(bench, {})) if arm.name != spec.reference else {"delta": 0.0}
            rows.append(row)
    expectations = []
    for e in spec.expect:
        metrics = records.get(e.arm, {}).get("metrics", {})
        if e.metric.startswith(LENGTH):  # length:A/B, within the arm: reasoning tokens on A vs on B
            a, _, b = e.metric.removeprefix(LENGTH).partition("/")
            tokens = metrics.get("reasoning_tokens", {})
            ratio = tokens[a] / tokens[b] if tokens.get(a) is not None and tokens.get(b) else None
            measured = (
                "n/a" if ratio is None else "up" if ratio > 1.1 else "down" if ratio < 1 / 1.1 else "same"
            )
            shown = "–" if ratio is None else f"×{ratio:.2f}"
            value = ratio
        else:
            diff = difference(metrics.get("accuracy", {}).get(e.metric, {}), ref.get(e.metric, {}))
            measured, value, shown = measured_direction(diff), diff["delta"], _signed(diff["delta"])
        agrees = None if measured == "n/a" else measured == e.direction
        expectations.append(
            e.model_dump() | {"value": value, "shown": shown, "measured": measured, "agrees": agrees}
        )
    data = {
        a.name: {
            "status": records.get(a.name, {}).get("status"),
            "fingerprint": records.get(a.name, {}).get("data", {}).get("fingerprint"),
            "traces": records.get(a.name, {}).get("data", {}).get("traces"),
            "questions": records.get(a.name, {}).get("data", {}).get("questions"),
            "trace_tokens": records.get(a.name, {}).get("data", {}).get("completion_tokens"),
            "train_rows": records.get(a.name, {}).get("mixture", {}).get("train_rows"),
            "steps": records.get(a.name, {}).get("train", {}).get("steps"),
            "examples_trained": records.get(a.name, {}).get("train", {}).get("samples_seen"),
        }
        for a in spec.arms
    }
    same: dict[str, list[str]] = defaultdict(list)
    for name, d in data.items():
        if d["fingerprint"]:
            same[d["fingerprint"]].append(name)
    lengths = {
        a.name: records.get(a.name, {}).get("metrics", {}).get("reasoning_tokens", {}) for a in spec.arms
    }
    return {
        "experiment": spec.name,
        "reference": spec.reference,
        "control": spec.control,
        "benchmarks": benches,
        "accuracy": rows,
        "data": data,
        "same_data": [names for names in same.values() if len(names) > 1],
        "reasoning_tokens": lengths,
        "reasoning_tokens_by_task": {
            a.name: records.get(a.name, {}).get("metrics", {}).get("reasoning_tokens_by_task", {})
            for a in spec.arms
        },
        "expectations": expectations,
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def report_markdown(result: Mapping[str, Any], plot_name: str = "comparison.png") -> str:
    """The comparison as markdown (accuracy in percent points)."""
    lines = [
        f"# Experiment {result['experiment']}",
        "",
        f"Reference arm: **{result['reference']}**; control: {result['control']}. Accuracy in %, mean ± std "
        "over protocol seeds; Δ vs the reference in points; *noise* = 2 standard errors of Δ.",
        "",
        "| arm | benchmark | accuracy | Δ | noise | beyond noise |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["accuracy"]:
        acc = f"{_pct(r['mean'])} ± {_pct(r['std'])}" if r["std"] is not None else _pct(r["mean"])
        beyond = {True: "yes", False: "no", None: "–"}[r.get("exceeds_noise")]
        lines.append(
            f"| {r['arm']} | {r['benchmark']} | {acc} | {_signed(r.get('delta'))} | "
            f"{_pct(r.get('noise'))} | {beyond} |"
        )
    lines += ["", "## Data and training per arm", "", "| arm | status | traces | questions | trace tokens | "
              "train rows | steps | examples trained | data fingerprint |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, d in result["data"].items():
        cells = [d.get(k) for k in ("status", "traces", "questions", "trace_tokens", "train_rows", "steps")]
        cells += [d.get("examples_trained"), f"`{d.get('fingerprint')}`"]
        lines.append(f"| {arm} | " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    if result["same_data"]:
        lines += ["", "Arms trained on identical data (same fingerprint): "
                  + "; ".join(", ".join(g) for g in result["same_data"])]  # fmt: skip
    tasks = sorted({t for v in result["reasoning_tokens_by_task"].values() for t in v})
    benches = sorted({b for v in result["reasoning_tokens"].values() for b in v})
    lines += ["", "## Reasoning length (mean reasoning tokens in evaluation replies)", ""]
    lines += ["| arm | " + " | ".join(benches + tasks) + " |", "|---" * (1 + len(benches) + len(tasks)) + "|"]
    for arm in result["reasoning_tokens"]:
        vals = [result["reasoning_tokens"][arm].get(b) for b in benches]
        vals += [result["reasoning_tokens_by_task"][arm].get(t) for t in tasks]
        lines.append(f"| {arm} | " + " | ".join("–" if v is None else f"{v:.0f}" for v in vals) + " |")
    if result["expectations"]:
        lines += ["", "## The paper's findings beside the measured effects", "",
                  "| arm | metric | paper | expected | measured (Δ points, or × for length) | measured | agrees |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for e in result["expectations"]:
            agrees = {True: "yes", False: "no", None: "–"}[e["agrees"]]
            lines.append(
                f"| {e['arm']} | {e['metric']} | {e['paper']} | {e['direction']} | {e['shown']} | "
                f"{e['measured']} | {agrees} |"
            )
    lines += ["", f"![accuracy and reasoning length per arm]({plot_name})", ""]
    return "\n".join(lines)


def report_png(result: Mapping[str, Any]) -> bytes:
    """Two panels: accuracy per benchmark per arm (error bars: seed std), reasoning tokens per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["data"])
    benches = [*result["benchmarks"], MACRO]
    cell = {(r["arm"], r["benchmark"]): r for r in result["accuracy"]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        xs = [j + i * width for j in range(len(benches))]
        means = [100 * (cell.get((arm, b), {}).get("mean") or 0.0) for b in benches]
        stds = [100 * (cell.get((arm, b), {}).get("std") or 0.0) for b in benches]
        ax1.bar(xs, means, width, yerr=stds, capsize=3, label=arm)
        lengths = [result["reasoning_tokens"].get(arm, {}).get(b, 0.0) for b in result["benchmarks"]]
        ax2.bar([j + i * width for j in range(len(result["benchmarks"]))], lengths, width, label=arm)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(benches))], benches, rotation=20)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title(f"{result['experiment']}: accuracy per arm (reference {result['reference']})")
    ax1.legend(fontsize=8)
    ax2.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(result["benchmarks"]))], result["benchmarks"], rotation=20
    )
    ax2.set_ylabel("mean reasoning tokens")
    ax2.set_title("reasoning length per benchmark")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
