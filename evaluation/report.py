"""Evaluation metrics over seeds, the reasoning-length plot, and the report beside the paper.

:class:`MetricsAccumulator` keeps running sums only (constant memory in the number of items):
per benchmark and seed the correct / parse-failure / error counts and token F1 sums, per
benchmark and per task type the reasoning-token sums. :meth:`MetricsAccumulator.summary` turns
them into accuracy as mean ± sample standard deviation over seeds (ddof 1; 0 with one seed).
"""

from __future__ import annotations

import io
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from evaluation.benchmarks import BENCHMARKS
from octomed_data.benchmarks import PAPER_CITATION

OPEN_TASKS = ("open_vqa", "open_qa")


class _Moments:
    """Count, sum and sum of squares: mean and standard deviation without keeping the values."""

    __slots__ = ("n", "total", "squares")

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.squares = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        self.squares += x * x

    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def std(self) -> float | None:
        if self.n < 2:
            return 0.0 if self.n else None
        var = (self.squares - self.total * self.total / self.n) / (self.n - 1)
        return math.sqrt(max(0.0, var))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x, nd)


class MetricsAccumulator:
    """Running counts per (benchmark, seed), per benchmark and per task type."""

    def __init__(self) -> None:
        self.seed_counts: dict[str, dict[int, dict[str, float]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(float))
        )
        self.bench: dict[str, dict[str, Any]] = defaultdict(
            lambda: {
                "reasoning": _Moments(),
                "completion": _Moments(),
                "forced": 0,
                "unclosed": 0,
                "task_types": defaultdict(int),
            }
        )
        self.task: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"reasoning": _Moments(), "correct": 0, "n": 0, "forced": 0, "benchmarks": set()}
        )

    def add(self, p: Mapping[str, Any]) -> None:
        """Count one prediction row (PREDICTION_SCHEMA)."""
        name, seed, task = p["benchmark"], int(p["seed"]), p["task_type"]
        c = self.seed_counts[name][seed]
        c["n"] += 1
        c["correct"] += int(p["correct"])
        # A request error (the reply's request, or its forced continuation, failed) is counted
        # as such; a reply that never arrived is not also a parse failure.
        failed = p.get("error") is not None and not p.get("response")
        c["errors"] += int(p.get("error") is not None)
        c["parse_failures"] += int(p["extracted_answer"] is None and not failed)
        if task in OPEN_TASKS:
            c["open"] += 1
            c["f1"] += float(p.get("token_f1") or 0.0)
        b = self.bench[name]
        b["reasoning"].add(p["reasoning_tokens"])
        b["completion"].add(p["completion_tokens"])
        b["forced"] += int(bool(p.get("forced_end")))
        b["unclosed"] += int(not p["think_closed"])
        b["task_types"][task] += 1
        t = self.task[task]
        t["reasoning"].add(p["reasoning_tokens"])
        t["correct"] += int(p["correct"])
        t["n"] += 1
        t["forced"] += int(bool(p.get("forced_end")))
        t["benchmarks"].add(name)

    def benchmark_summary(self, name: str) -> dict[str, Any]:
        seeds = self.seed_counts.get(name, {})
        per_seed = {s: c for s, c in sorted(seeds.items())}
        acc = [c["correct"] / c["n"] for c in per_seed.values() if c["n"]]
        acc_mean, acc_std = _mean_std(acc)
        f1 = [c["f1"] / c["open"] for c in per_seed.values() if c["open"]]
        f1_mean, f1_std = _mean_std(f1)
        n = sum(c["n"] for c in per_seed.values())
        parse = sum(c["parse_failures"] for c in per_seed.values())
        b = self.bench.get(name)
        return {
            "seeds": sorted(per_seed),
            "predictions": int(n),
            "accuracy_mean": _r(acc_mean),
            "accuracy_std": _r(acc_std),
            "accuracy_per_seed": [_r(a) for a in acc],
            "parse_failures": int(parse),
            "parse_failure_rate": _r(parse / n) if n else None,
            "request_errors": int(sum(c["errors"] for c in per_seed.values())),
            "open_predictions": int(sum(c["open"] for c in per_seed.values())),
            "token_f1_mean": _r(f1_mean),
            "token_f1_std": _r(f1_std),
            "reasoning_tokens_mean": _r(b["reasoning"].mean(), 3) if b else None,
            "reasoning_tokens_std": _r(b["reasoning"].std(), 3) if b else None,
            "completion_tokens_mean": _r(b["completion"].mean(), 3) if b else None,
            "forced_end": int(b["forced"]) if b else 0,
            "think_unclosed": int(b["unclosed"]) if b else 0,
            "task_types": dict(sorted(b["task_types"].items())) if b else {},
        }

    def task_summary(self) -> dict[str, Any]:
        return {
            task: {
                "predictions": t["n"],
                "accuracy": _r(t["correct"] / t["n"]) if t["n"] else None,
                "reasoning_tokens_mean": _r(t["reasoning"].mean(), 3),
                "reasoning_tokens_std": _r(t["reasoning"].std(), 3),
                "forced_end": t["forced"],
                "benchmarks": sorted(t["benchmarks"]),
            }
            for task, t in sorted(self.task.items())
        }


def macro_accuracy(per_benchmark: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Mean of the benchmarks' mean accuracies (each benchmark counts once, whatever its size)."""
    vals = [b["accuracy_mean"] for b in per_benchmark.values() if b.get("accuracy_mean") is not None]
    return _r(statistics.fmean(vals)) if vals else None


# --------------------------------------------------------------------------- plot


def reasoning_length_png(metrics: Mapping[str, Any]) -> bytes:
    """Mean reasoning tokens (± std) per task type and per benchmark: the task-aware length view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = metrics.get("per_task_type") or {}
    benches = {k: v for k, v in (metrics.get("per_benchmark") or {}).items() if v.get("predictions")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    for ax, data, title in (
        (axes[0], tasks, "per task type"),
        (axes[1], benches, "per benchmark"),
    ):
        names = list(data)
        means = [data[n].get("reasoning_tokens_mean") or 0.0 for n in names]
        stds = [data[n].get("reasoning_tokens_std") or 0.0 for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="#4C72B0")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("reasoning tokens (mean ± std)")
        ax.set_title(f"Reasoning length {title}")
        for i, n in enumerate(names):
            forced = data[n].get("forced_end") or 0
            if forced:
                ax.annotate(f"{forced} forced", (i, means[i]), ha="center", va="bottom", fontsize=7)
    model = metrics.get("backend", {}).get("model") or metrics.get("backend", {}).get("served_model_name")
    fig.suptitle(f"{model} · {metrics.get('protocol', {}).get('prompting', '')}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _sampling_text(sampling: Mapping[str, Any] | None) -> str:
    """The effective sampling settings as ``key=value`` pairs (the checkpoint's ignored ones apart)."""
    if not sampling:
        return "not recorded"
    shown = {
        k: v for k, v in sampling.items() if k not in ("ignored_checkpoint_generation_config", "extra_body")
    }
    text = ", ".join(f"{k}={v}" for k, v in shown.items())
    extra = sampling.get("extra_body")
    if extra:
        text += f", extra request fields {dict(extra)}"
    ignored = sampling.get("ignored_checkpoint_generation_config")
    if ignored:
        text += f"; ignored from the checkpoint's generation_config: {dict(ignored)}"
    return text


def report_markdown(metrics: Mapping[str, Any]) -> str:
    """The per-benchmark table beside the paper's OctoMed-7B numbers, plus the protocol used."""
    proto = metrics.get("protocol", {})
    backend = metrics.get("backend", {})
    lines = [
        f"# Evaluation of `{backend.get('model') or backend.get('served_model_name')}`",
        "",
        f"Backend `{backend.get('backend')}`; prompting `{proto.get('prompting')}` "
        f"({metrics.get('prompt_version')}); temperature {proto.get('temperature')}, top-p {proto.get('top_p')}, "
        f"{len(proto.get('seeds', []))} seed(s) {proto.get('seeds')}, up to {proto.get('max_new_tokens')} new tokens, "
        f"end of thinking forced: {proto.get('force_end_of_thinking')} (+{proto.get('force_answer_tokens')} tokens).",
        "",
        f"Sampling in effect: {_sampling_text(metrics.get('sampling'))}.",
        "",
        "| Benchmark | Items | Skipped | Accuracy % (mean ± std over seeds) | Parse fail % | Request errors "
        "| Token F1 (open) | Reasoning tokens (mean) | Forced ends | OctoMed-7B (paper) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b in (metrics.get("per_benchmark") or {}).items():
        skipped = b.get("skipped", 0)
        reasons = b.get("skipped_by_reason") or {}
        skip_txt = f"{skipped}" + (
            f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())})" if skipped else ""
        )
        acc = b.get("accuracy_mean")
        acc_txt = "–" if acc is None else f"{100 * acc:.2f} ± {100 * (b.get('accuracy_std') or 0):.2f}"
        f1 = b.get("token_f1_mean")
        paper = BENCHMARKS[name].paper_octomed_7b if name in BENCHMARKS else None
        lines.append(
            f"| {name} | {b.get('items', 0)} | {skip_txt} | {acc_txt} | {_pct(b.get('parse_failure_rate'))} "
            f"| {b.get('request_errors', 0)} "
            f"| {'–' if f1 is None else f'{f1:.3f}'} | {b.get('reasoning_tokens_mean') if b.get('reasoning_tokens_mean') is not None else '–'} "
            f"| {b.get('forced_end', 0)} | {'–' if paper is None else f'{paper:.2f}'} |"
        )
    missing = [
        f"{spec.name} ({spec.paper_octomed_7b:.2f})"
        for spec in BENCHMARKS.values()
        if spec.paper_octomed_7b is not None and spec.name not in (metrics.get("per_benchmark") or {})
    ]
    lines += [
        "",
        f"Macro accuracy over the benchmarks above: {_pct(metrics.get('macro_accuracy'))} %. "
        f"Request errors: {metrics.get('request_errors', 0)} of {metrics.get('predictions', 0)} replies "
        "(scored wrong; the run fails past max_request_error_rate).",
        "",
        f"Paper column: OctoMed-7B as reported in {PAPER_CITATION} (MedQA 90.81, MedMCQA 72.70, "
        "MedXpertQA-Text 24.51, PMC-VQA 61.13, MedXpertQA-MM 36.65). The paper evaluates full test sets with "
        "their images; rows here evaluate only the items listed under *Items* (see *Skipped*), so compare "
        "with care.",
    ]
    if missing:
        lines.append(f"Not evaluated in this run: {', '.join(missing)}.")
    lines += [
        "",
        "## Reasoning length per task type",
        "",
        "| Task type | Predictions | Accuracy % | Reasoning tokens (mean ± std) | Forced ends |",
        "|---|---:|---:|---:|---:|",
    ]
    for task, t in (metrics.get("per_task_type") or {}).items():
        lines.append(
            f"| {task} | {t['predictions']} | {_pct(t['accuracy'])} | "
            f"{t['reasoning_tokens_mean']} ± {t['reasoning_tokens_std']} | {t['forced_end']} |"
        )
    lines += ["", "![reasoning length](reasoning_length.png)", ""]
    return "\n".join(lines)
