"""The comparison report drawn: markdown tables (accuracy in percent points) and the two plots
(accuracy per arm and group with intervals; learning curves). Every number comes from
:func:`octomed_data.experiment.compare.compare`'s result."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from octomed_data.experiment.compare import MACRO, ci_text, signed
from octomed_data.experiment.spec import TASK_GROUPS


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


_YES = {True: "yes", False: "no", None: "–"}


def report_markdown(result: Mapping[str, Any], plot_name: str = "comparison.png") -> str:
    """The comparison as markdown (accuracy in percent points)."""
    st = result["statistics"]
    lines = [
        f"# Experiment {result['experiment']}",
        "",
        f"Reference arm: **{result['reference']}**; control: {result['control']}. Accuracy in %, mean ± std "
        f"over protocol seeds; Δ vs the reference in points with its {100 * st['confidence']:.0f}% interval "
        f"({st['test']}, {st['resamples']} resamples, seed {st['seed']}); *beyond noise*: the interval "
        "excludes 0.",
        "",
        "| arm | benchmark | accuracy | Δ | 95% CI | beyond noise |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["accuracy"]:
        acc = f"{_pct(r['mean'])} ± {_pct(r['std'])}" if r["std"] is not None else _pct(r["mean"])
        lines.append(
            f"| {r['arm']} | {r['benchmark']} | {acc} | {signed(r.get('delta'))} | {ci_text(r)} | "
            f"{_YES[r.get('beyond_noise')]} |"
        )
    if result["groups"]:
        by = sorted(set(st["groups_by"].values()))
        how = "whether the item has an image" if by == ["image"] else f"{' / '.join(by)} (no question file)"
        lines += ["", "## Per task group (the paper's Fig. 1)", "",
                  f"Mean over each group's benchmarks of the accuracy on its items; groups by {how}.", "",
                  "| arm | group | accuracy | benchmarks | Δ | 95% CI | beyond noise |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for g in result["groups"]:
            lines.append(
                f"| {g['arm']} | {g['group']} | {_pct(g['mean'])} | {g['benchmarks']} | {signed(g.get('delta'))} | "
                f"{ci_text(g)} | {_YES[g.get('beyond_noise')]} |"
            )
    lines += ["", "## Data and training per arm", "", "| arm | status | trains on | traces | questions | trace "
              "tokens | train rows | steps | examples trained | final loss | checkpoint of | data fingerprint |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, d in result["data"].items():
        keys = ("status", "content", "traces", "questions", "trace_tokens", "train_rows", "steps")
        cells = [d.get(k) for k in keys]
        loss = d.get("final_loss")
        cells += [d.get("examples_trained"), None if loss is None else f"{loss:.4f}", d.get("trained_by")]
        cells += [f"`{d.get('fingerprint')}`"]
        lines.append(f"| {arm} | " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    if result["same_data"]:
        lines += ["", "Arms trained on identical data (same fingerprint): "
                  + "; ".join(", ".join(g) for g in result["same_data"])]  # fmt: skip
    if result["shared_checkpoints"]:
        lines += ["", "Arms sharing one checkpoint (same data and training settings, trained once; "
                  "each evaluated with its own settings): "
                  + "; ".join(", ".join(g) for g in result["shared_checkpoints"])]  # fmt: skip
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
                  "| arm | metric | paper | expected | measured (Δ points [95% CI], or × for length) | measured | agrees |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for e in result["expectations"]:
            lines.append(
                f"| {e['arm']} | {e['metric']} | {e['paper']} | {e['direction']} | {e['shown']} | "
                f"{e['measured']} | {_YES[e['agrees']]} |"
            )
    if result.get("teachers"):
        lines += ["", "## Teachers (one distillation of the same questions each)", "",
                  "Pass rate: accepted / judged samples of the teacher's distillation; reasoning: mean characters "
                  "of the accepted traces' reasoning, and mean completion tokens of their replies; cost: the "
                  "distillation's USD (simulated: sandbox replies priced at the recipe's prices); accuracy: "
                  "the arm trained on its traces (macro, Δ vs the reference).", "",
                  "| arm | teacher | run | pass rate | accepted | reasoning chars | completion tokens | cost USD | "
                  "accuracy | Δ | 95% CI |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for t in result["teachers"]:
            cost = "–" if t.get("cost_usd") is None else f"{t['cost_usd']:.4f}"
            cost += " (simulated)" if t.get("simulated") else ""
            rate = "–" if t.get("pass_rate") is None else f"{100 * t['pass_rate']:.1f}%"
            lines.append(
                f"| {t['arm']} | {t['name']} | {t['run_id']} | {rate} | {t.get('accepted')} | "
                f"{t.get('reasoning_chars')} | {t.get('completion_tokens')} | {cost} | {_pct(t.get('accuracy'))} | "
                f"{signed(t.get('delta'))} | {ci_text(t)} |"
            )
    curves = result.get("learning_curves") or {}
    if curves:
        lines += ["", "## Learning curves (accuracy at intermediate checkpoints)", "",
                  "Macro accuracy (mean over benchmarks of the mean over seeds) of each evaluated checkpoint, "
                  "by optimizer step and examples (sequences) trained on up to it.", "",
                  "| arm | step | examples seen | accuracy |", "|---|---|---|---|"]  # fmt: skip
        for arm, points in curves.items():
            for p in points:
                seen = "–" if p["examples"] is None else str(p["examples"])
                lines.append(f"| {arm} | {p['step']} | {seen} | {_pct(p['accuracy'])} |")
        lines += ["", "![accuracy against examples seen per arm](learning_curves.png)"]
    lines += ["", f"![accuracy, task groups and reasoning length per arm]({plot_name})", ""]
    return "\n".join(lines)


def learning_curves_png(result: Mapping[str, Any]) -> bytes | None:
    """Accuracy against examples seen, one line per arm with a learning curve (None: no curve)."""
    curves = result.get("learning_curves") or {}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, points in curves.items():
        xs = [p["examples"] if p["examples"] is not None else p["step"] for p in points]
        ax.plot(xs, [100 * (p["accuracy"] or 0.0) for p in points], marker="o", label=arm)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("examples seen (sequences trained on)")
    ax.set_ylabel("macro accuracy (%)")
    ax.set_title(f"{result['experiment']}: learning curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def report_png(result: Mapping[str, Any]) -> bytes:
    """Three panels: accuracy per benchmark per arm (error bars: seed std), accuracy per task group
    (error bars: the 95% interval of Δ, placed on the arm's mean), reasoning tokens per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["data"])
    benches = [*result["benchmarks"], MACRO]
    cell = {(r["arm"], r["benchmark"]): r for r in result["accuracy"]}
    group_cell = {(g["arm"], g["group"]): g for g in result["groups"]}
    groups = [g for g in TASK_GROUPS if any(k[1] == g for k in group_cell)]
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        xs = [j + i * width for j in range(len(benches))]
        means = [100 * (cell.get((arm, b), {}).get("mean") or 0.0) for b in benches]
        stds = [100 * (cell.get((arm, b), {}).get("std") or 0.0) for b in benches]
        ax1.bar(xs, means, width, yerr=stds, capsize=3, label=arm)
        gm, lo, hi = [], [], []
        for g in groups:
            c = group_cell.get((arm, g), {})
            m = 100 * (c.get("mean") or 0.0)
            d = c.get("delta")
            gm.append(m)
            # The interval of Δ, drawn around the arm's mean (reference: none).
            lo.append(0.0 if c.get("ci_low") is None or d is None else 100 * (d - c["ci_low"]))
            hi.append(0.0 if c.get("ci_high") is None or d is None else 100 * (c["ci_high"] - d))
        ax3.bar([j + i * width for j in range(len(groups))], gm, width, yerr=[lo, hi], capsize=3, label=arm)
        lengths = [result["reasoning_tokens"].get(arm, {}).get(b, 0.0) for b in result["benchmarks"]]
        ax2.bar([j + i * width for j in range(len(result["benchmarks"]))], lengths, width, label=arm)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(benches))], benches, rotation=20)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title(f"{result['experiment']}: accuracy per arm (reference {result['reference']})")
    ax1.legend(fontsize=8)
    ax3.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups)
    ax3.set_ylabel("accuracy (%)")
    ax3.set_title("per task group (bars: 95% CI of Δ vs reference)")
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
