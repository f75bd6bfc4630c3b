"""Run report: the filter stage's statistics as a PNG plot, markdown and table rows.

The plot has two panels: reasoning length (words) per task type, and pass rate (accepted /
all samples) per source. The markdown report says what the run produced and where, and says
plainly when traces came from the sandbox teacher (not a model). The same rows feed the
Prefect table artifacts, so the dashboard and the report never disagree.
"""

from __future__ import annotations

import base64
import io
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from octomed_data import storage
from octomed_data.layout import FilterFolder, ReportFolder, RunPaths
from octomed_data.shard_table import ShardTable, shard_table, shard_table_rows
from octomed_data.teachers import SIMULATED_LABEL, is_simulated

_RESERVOIR = 20_000  # lengths kept per task type for the box plot; counts and means stay exact


@dataclass
class SourceStats:
    samples: int = 0  # teacher replies (failed requests are not samples)
    accepted: int = 0
    failed: int = 0  # requests that failed after every retry
    reject_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def pass_rate(self) -> float | None:
        return self.accepted / self.samples if self.samples else None  # as stats.json: no samples, no rate


@dataclass
class LengthStats:
    count: int = 0
    total_words: int = 0
    reservoir: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return self.total_words / self.count if self.count else 0.0


@dataclass
class SampleStats:
    """What the raw samples of a run say, aggregated in one streaming pass."""

    sources: dict[str, SourceStats] = field(default_factory=lambda: defaultdict(SourceStats))
    task_lengths: dict[str, LengthStats] = field(default_factory=lambda: defaultdict(LengthStats))
    teachers: Counter[str] = field(default_factory=Counter)
    # stats.json's ``verifier``: verdicts per verifier per source, the judge's calibration, its cost.
    verifier: dict[str, Any] = field(default_factory=dict)
    # stats.json's ``audit``: the gold-label audit per source (flags, counts, example questions).
    audit: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.sources.values())

    @property
    def accepted(self) -> int:
        return sum(s.accepted for s in self.sources.values())

    @property
    def sandbox_only(self) -> bool:
        return bool(self.teachers) and all(is_simulated(t) for t in self.teachers)

    @property
    def any_sandbox(self) -> bool:
        return any(is_simulated(t) for t in self.teachers)


def sample_stats(stats: Mapping[str, Any]) -> SampleStats:
    """The report's view of the filter stage's statistics (``filter/stats.json``, one pass for both)."""
    out = SampleStats()
    for name, src in (stats.get("sources") or {}).items():
        s = out.sources[name]
        s.samples = int(src.get("samples") or 0)
        s.accepted = int(src.get("accepted") or 0)
        s.failed = int(src.get("failed_requests") or 0)
        s.reject_reasons.update(src.get("reject_reasons") or {})
    for task, lengths in (stats.get("reasoning_words_by_task") or {}).items():
        ls = out.task_lengths[task]
        ls.count = int(lengths.get("count") or 0)
        ls.total_words = round((lengths.get("mean") or 0) * ls.count)
        ls.reservoir = list(lengths.get("sample") or [])
    out.teachers.update(stats.get("teachers") or {})
    out.verifier = dict(stats.get("verifier") or {})
    out.audit = dict(stats.get("audit") or {})
    return out


def audit_rows(stats: SampleStats) -> list[dict[str, Any]]:
    """One row per source: questions audited, flagged as suspected label errors / never correct."""
    keys = ("questions", "questions_answered", "suspected_label_error", "never_correct")
    keys += ("all_requests_failed", "none_answered")
    return [
        {"source": src} | {k: m.get(k) for k in keys} for src, m in (stats.audit.get("sources") or {}).items()
    ]


def audit_markdown(stats: SampleStats) -> list[str]:
    """The report's gold-label audit: counts per source and a few flagged questions, gold vs majority."""
    a = stats.audit
    if not a.get("sources"):
        return []
    cfg = a.get("settings") or {}
    lines = [
        "## Gold-label audit",
        "",
        f"`suspected_label_error`: at least {cfg.get('min_samples')} answered samples, at least "
        f"{cfg.get('agree_share', 0):.0%} of them on one answer other than the gold, at most "
        f"{cfg.get('max_correct_share', 0):.0%} correct. `never_correct`: answered, never right. "
        f"Per question: `{a.get('dataset')}`.",
        "",
        _md_table(audit_rows(stats)),
        "",
    ]
    examples = []
    for src, m in (a.get("sources") or {}).items():
        for flag, items in (m.get("examples") or {}).items():
            for e in items[:3]:
                share = e.get("majority_share")
                examples.append(
                    f"- `{e.get('question_id')}` ({src}, {flag}): gold `{e.get('gold_answer')}`, majority "
                    f"`{e.get('majority_answer')}`"
                    + (f" ({share:.0%} of {e.get('n_answered')} answered)" if share is not None else "")
                )
    if examples:
        lines += ["Examples:", "", *examples, ""]
    return lines


def calibration_rows(stats: SampleStats) -> list[dict[str, Any]]:
    """One row per source (and overall): the LLM judge against exact match on closed replies."""
    keys = ("judged", "precision", "recall", "false_accept_rate", "agreement", "kappa", "fp", "fn")
    cal = stats.verifier.get("calibration") or {}
    return [{"source": src} | {k: m.get(k) for k in keys} for src, m in cal.items()]


def verifier_markdown(stats: SampleStats) -> list[str]:
    """The report's verifier section: who verified what, the judge's calibration and cost."""
    v = stats.verifier
    by = v.get("verified_by") or {}
    if not by and not v.get("calibration"):
        return []
    lines = ["## Verifier", ""]
    methods = sorted({m for counts in by.values() for m in counts})
    rows = [{"source": src} | {m: counts.get(m, 0) for m in methods} for src, counts in sorted(by.items())]
    lines += ["Verdicts per verifier (open-ended answers follow the source's `verify` mode):", ""]
    lines += [_md_table(rows), ""]
    if v.get("calibration"):
        lines += [
            "LLM judge calibration: closed replies judged as if open-ended, against exact match "
            "(precision: of the replies the judge accepts, the share exact match accepts too).",
            "",
            _md_table(calibration_rows(stats)),
            "",
        ]
    cost = v.get("judge_cost")
    if cost:
        lines += [
            f"Judge `{cost.get('model')}` (rubric `{cost.get('rubric_version')}`): "
            f"{cost.get('journalled')} judgements journalled, {cost.get('prompt_tokens')} prompt + "
            f"{cost.get('completion_tokens')} completion tokens, USD {cost.get('cost_usd')}.",
            "",
        ]
    return lines


def rejection_rows(stats: SampleStats) -> list[dict[str, Any]]:
    """One row per source: samples, accepted, pass rate, top rejection reasons."""
    rows = []
    for name, s in sorted(stats.sources.items()):
        rows.append(
            {
                "source": name,
                "samples": s.samples,
                "accepted": s.accepted,
                "rejected": s.samples - s.accepted,
                "failed_requests": s.failed,
                "pass_rate": round(s.pass_rate, 4) if s.pass_rate is not None else None,
                "reject_reasons": ", ".join(f"{k}={v}" for k, v in s.reject_reasons.most_common(5)) or "-",
            }
        )
    return rows


def render_plot(stats: SampleStats) -> bytes:
    """PNG with reasoning length per task type and pass rate per source (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (PercentFormatter below)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    tasks = sorted(stats.task_lengths)
    if tasks:
        ax1.boxplot([stats.task_lengths[t].reservoir or [0] for t in tasks], showfliers=False)
        # n under each box: a box over 3 traces and one over 30,000 look alike otherwise
        labels = [f"{t}\n(n={stats.task_lengths[t].count:,})" for t in tasks]
        ax1.set_xticks(range(1, len(tasks) + 1), labels, rotation=20)
    else:
        ax1.text(0.5, 0.5, "no accepted traces", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_title("Reasoning length of accepted traces")
    ax1.set_ylabel("words")
    sources = sorted(stats.sources)
    rates = [stats.sources[s].pass_rate for s in sources]
    ax2.bar(range(len(sources)), rates, color="#4C72B0")
    ax2.set_xticks(range(len(sources)), sources, rotation=20)
    ax2.set_ylim(0, 1)
    ax2.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax2.set_title("Pass rate per source (accepted / samples)")
    for i, (name, r) in enumerate(zip(sources, rates, strict=True)):
        s = stats.sources[name]
        ax2.text(i, min(r + 0.02, 0.9), f"{r:.0%}\n{s.accepted:,}/{s.samples:,}", ha="center", fontsize=8)
    if stats.sandbox_only:
        fig.suptitle("SANDBOX TEACHER: not model traces", color="#B00020")
    elif stats.any_sandbox:
        share = stats.teachers[SIMULATED_LABEL] / sum(stats.teachers.values())
        fig.suptitle(f"{share:.0%} of samples from the SANDBOX TEACHER (not model traces)", color="#B00020")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _md_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "_none_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(
    *,
    run_id: str,
    stats: SampleStats,
    shards: Sequence[Mapping[str, Any]] | ShardTable = (),
    outputs: Mapping[str, str] | None = None,
    cost: Mapping[str, Any] | None = None,
    counts: Mapping[str, Any] | None = None,
    png: str | bytes | None = None,
) -> str:
    """The run report. ``png`` is a link target (URI) or the PNG bytes, embedded as a data URI."""
    lines = [f"# OctoMed data factory run `{run_id}`", ""]
    if stats.any_sandbox:
        share = stats.teachers[SIMULATED_LABEL] / max(1, sum(stats.teachers.values()))
        lines += [
            f"> **Warning: {share:.0%} of the samples come from the sandbox teacher (`teacher=sandbox`). "
            "These are NOT model traces**: the sandbox is a deterministic OpenAI-compatible stand-in "
            "that exercises the pipeline. Configure a real teacher endpoint for real data.",
            "",
        ]
    lines += [
        f"Samples: **{stats.samples}**, accepted (final answer = gold): **{stats.accepted}**"
        + (f" ({stats.accepted / stats.samples:.1%})" if stats.samples else ""),
        "",
    ]
    if counts:
        lines += ["## Counts", "", _md_table([{"stage": k, "count": v} for k, v in counts.items()]), ""]
    lines += ["## Rejection sampling per source", "", _md_table(rejection_rows(stats)), ""]
    lines += verifier_markdown(stats)
    lines += audit_markdown(stats)
    length_rows = [
        {"task_type": t, "accepted_traces": s.count, "mean_reasoning_words": round(s.mean, 1)}
        for t, s in sorted(stats.task_lengths.items())
    ]
    lines += ["## Reasoning length per task type", "", _md_table(length_rows), ""]
    if png is not None:
        src = (
            "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            if isinstance(png, bytes)
            else str(png)
        )
        lines += [f"![reasoning length and pass rate]({src})", ""]
    if cost:
        lines += ["## Cost", "", _md_table([{"item": k, "value": v} for k, v in cost.items()]), ""]
    if isinstance(shards, ShardTable):
        summary = shards.summary
        text = summary.markdown(shards.table_uri, level=2) if summary else _md_table(shards.rows)
        lines += ["## Shards", "", text, ""]
    elif shards:
        lines += ["## Shards", "", _md_table(shard_table_rows(shards)), ""]
    if outputs:
        lines += ["## Outputs", "", _md_table([{"output": k, "uri": v} for k, v in outputs.items()]), ""]
    return "\n".join(lines)


@dataclass
class ReportResult:
    markdown_uri: str
    png_uri: str
    markdown: str
    stats: SampleStats


def write_report(
    statistics: Mapping[str, Any],
    out: str,
    *,
    run_id: str,
    shards: Sequence[Mapping[str, Any]] | ShardTable = (),
    outputs: Mapping[str, str] | None = None,
    cost: Mapping[str, Any] | None = None,
    counts: Mapping[str, Any] | None = None,
) -> ReportResult:
    """Write ``out/report.png`` and ``out/report.md`` (which links the PNG next to it).

    ``statistics`` is the filter stage's ``stats.json`` (empty before any sample was judged).
    """
    stats = sample_stats(statistics)
    png = render_plot(stats)
    png_uri = ReportFolder(out).plot
    storage.write_bytes(png_uri, png)
    md = report_markdown(
        run_id=run_id,
        stats=stats,
        shards=shards,
        outputs=outputs,
        cost=cost,
        counts=counts,
        png="report.png",
    )
    md_uri = ReportFolder(out).markdown
    storage.write_bytes(md_uri, md.encode("utf-8"))
    return ReportResult(markdown_uri=md_uri, png_uri=png_uri, markdown=md, stats=stats)


# ---------------------------------------------------------------------------- a run's report


def run_outputs(paths: RunPaths) -> dict[str, str]:
    """The run's output locations that exist so far, for the report's table."""
    candidates = {
        "questions (ingested)": paths.ingested,
        "quarantine": paths.quarantine,
        "questions (decontaminated)": paths.questions,
        "removed by decontamination": paths.removed,
        "samples (all teacher replies)": paths.raw,
        "verdicts": paths.verdicts,
        "samples (accepted)": paths.accepted,
        "gold-label audit": FilterFolder(paths.stage("filter")).audit,
        "mixture": paths.mixture,
        "export": paths.export,
        "checkpoint": paths.checkpoints,
        "evaluation": paths.evaluation,
    }
    return {k: v for k, v in candidates.items() if storage.exists(v)}


def run_counts(paths: RunPaths) -> dict[str, Any]:
    """Question counts per stage, and what decontamination removed per benchmark (streamed)."""

    def rows(uri: str) -> int | None:  # None: nothing committed there (one look at the markers)
        counted = storage.Dataset(uri).committed(lambda info: info.rows)
        return sum(counted.values()) if counted else None

    counts: dict[str, Any] = {
        "questions ingested": rows(paths.ingested),
        "records quarantined": rows(paths.quarantine),
        "questions after decontamination": rows(paths.questions),
        "mixture rows (train)": rows(paths.mixture_train),
        "mixture rows (validation)": rows(paths.mixture_validation),
    }
    removed = storage.Dataset(paths.removed)
    if removed.has_committed():
        by_benchmark: Counter[str] = Counter()
        for batch in removed.iter_batches(columns=["match_benchmark"]):
            by_benchmark.update(batch.column(0).to_pylist())
        counts["removed by decontamination"] = sum(by_benchmark.values())
        for bench, n in sorted(by_benchmark.items()):
            counts[f"  removed: {bench}"] = n
    return {k: v for k, v in counts.items() if v is not None}


def run_cost(paths: RunPaths) -> dict[str, Any]:
    """The cost ledger's flat totals (empty before distillation finalised)."""
    if not storage.exists(paths.cost):
        return {}
    cost = storage.read_json(paths.cost)
    flat = {k: v for k, v in cost.items() if isinstance(v, int | float | str) and k != "basis"}
    return flat or {"cost": str(cost)[:200]}


def run_statistics(paths: RunPaths) -> dict[str, Any]:
    """The filter stage's ``stats.json`` (empty before any sample was judged)."""
    return storage.read_json(paths.stats) if storage.exists(paths.stats) else {}


def run_report_parts(paths: RunPaths) -> dict[str, Any]:
    """What the run report shows besides the statistics: shard attempts (a table, or past a few
    hundred shards a summary and the full table as CSV), outputs, cost, counts."""
    return {
        "run_id": paths.run_id,
        "shards": shard_table(paths),
        "outputs": run_outputs(paths),
        "cost": run_cost(paths),
        "counts": run_counts(paths),
    }


def embedded_run_report(
    paths: RunPaths, parts: Mapping[str, Any] | None = None, stats: SampleStats | None = None
) -> str:
    """The dashboard copy of the run report: the stored PNG embedded (the stored file may not be
    reachable from a browser), the report's own files among the outputs."""
    parts = dict(parts or run_report_parts(paths))
    folder = ReportFolder(paths.report)
    parts["outputs"] = dict(parts["outputs"]) | {"report": folder.markdown, "plot": folder.plot}
    stats = stats or sample_stats(run_statistics(paths))
    return report_markdown(stats=stats, png=storage.read_bytes(folder.plot), **parts)
