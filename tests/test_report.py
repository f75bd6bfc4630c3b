"""Report: streamed statistics, PNG plot, markdown with the sandbox warning, table rows."""

from __future__ import annotations

import io

from PIL import Image

from octomed_data import storage
from octomed_data.report import (
    rejection_rows,
    render_plot,
    report_markdown,
    sample_stats,
    shard_table_rows,
    write_report,
)
from octomed_data.schema import SAMPLE_SCHEMA, VERDICT_SCHEMA
from octomed_data.stats import source_statistics
from tests.support.orchestration import write_inputs


def statistics_of(samples_uri: str, tmp_path) -> dict:
    """The filter stage's one statistics pass over judged samples (written as verdicts)."""
    verdicts = storage.Dataset(str(tmp_path / "verdicts"), VERDICT_SCHEMA)
    rows = storage.Dataset(samples_uri, SAMPLE_SCHEMA).read_all().to_pylist()
    for r in rows:
        r["reasoning_chars"] = len(r["reasoning"] or "")
        r["reasoning_words"] = len((r["reasoning"] or "").split())
    verdicts.write_shard("00000", rows)
    return source_statistics(verdicts.uri)


def test_stats_plot_and_markdown(shared_data, tmp_path):
    accepted, _ = write_inputs(shared_data, str(tmp_path / "in"), n_text=4, n_image=2)
    statistics = statistics_of(accepted, tmp_path)
    stats = sample_stats(statistics)
    # 6 questions x (3 accepted + 1 rejected)
    assert (stats.samples, stats.accepted) == (24, 18)
    assert stats.sandbox_only
    rows = {r["source"]: r for r in rejection_rows(stats)}
    assert rows["medqa"]["pass_rate"] == 0.75 and "unknown=4" in rows["medqa"]["reject_reasons"]
    assert set(stats.task_lengths) == {"text_mcq", "mm_mcq"}

    png = render_plot(stats)
    assert Image.open(io.BytesIO(png)).size[0] > 500

    result = write_report(
        statistics,
        str(tmp_path / "report"),
        run_id="r1",
        shards=[{"stage": "distill", "shard": "00000", "state": "COMPLETED", "samples": 24, "extra": 1}],
        outputs={"mixture": "file:///x"},
        cost={"usd": 0.0},
    )
    assert storage.read_bytes(result.png_uri)[:8] == b"\x89PNG\r\n\x1a\n"
    md = storage.read_bytes(result.markdown_uri).decode()
    assert "NOT model traces" in md and "![reasoning length and pass rate](report.png)" in md
    assert "| medqa | 16 | 12 | 4 | 0 | 0.75 |" in md
    # the gold-label audit of the same pass: 4 questions, all answered right, nothing flagged
    assert "## Gold-label audit" in md and "| medqa | 4 | 4 | 0 | 0 | 0 | 0 |" in md
    assert statistics["audit"]["overall"]["suspected_label_error"] == 0
    embedded = report_markdown(run_id="r1", stats=stats, png=png)
    assert "data:image/png;base64," in embedded


def test_shard_rows_keep_known_keys():
    rows = shard_table_rows([{"stage": "ingest", "shard": "a", "state": "FAILED", "error": "x", "junk": 1}])
    assert rows[0]["state"] == "FAILED" and "junk" not in rows[0] and rows[0]["samples"] is None


def test_empty_run_renders(tmp_path):
    stats = sample_stats({})
    assert stats.samples == 0 and not stats.any_sandbox
    assert render_plot(stats)[:4] == b"\x89PNG"
    assert "NOT model traces" not in report_markdown(run_id="e", stats=stats)
    assert "Gold-label audit" not in report_markdown(run_id="e", stats=stats)


def test_audit_section_lists_flagged_examples():
    """The report's audit section: counts per source, and flagged questions with gold vs majority."""
    audit = {
        "settings": {"min_samples": 4, "agree_share": 0.75, "max_correct_share": 0.25},
        "dataset": "file:///run/filter/audit",
        "sources": {
            "medqa": {
                "questions": 10,
                "questions_answered": 9,
                "suspected_label_error": 1,
                "never_correct": 1,
                "all_requests_failed": 1,
                "none_answered": 0,
                "examples": {
                    "suspected_label_error": [
                        {
                            "question_id": "q1",
                            "gold_answer": "B",
                            "majority_answer": "D",
                            "majority_share": 0.875,
                            "n_answered": 16,
                            "n_correct": 1,
                        }
                    ]
                },
            }
        },
    }
    md = report_markdown(run_id="a", stats=sample_stats({"audit": audit}))
    assert "| medqa | 10 | 9 | 1 | 1 | 1 | 0 |" in md
    assert "- `q1` (medqa, suspected_label_error): gold `B`, majority `D` (88% of 16 answered)" in md
    assert "at least 75% of them on one answer other than the gold" in md


def test_report_stage_is_rewritten_only_when_what_it_shows_changed(shared_data, tmp_path):
    """The report is a global step with a done marker: a second pass rewrites nothing; new
    statistics or a re-committed verdicts shard rewrite it; the dashboard copy embeds the PNG."""
    import json
    import shutil
    from pathlib import Path

    from octomed_data.layout import RunPaths
    from octomed_data.report import embedded_run_report
    from octomed_data.stages import LocalExecutor, raise_for_failures, run_stage
    from octomed_data.stages.report import ReportStage

    paths = RunPaths.at(str(tmp_path / "run"))
    accepted, questions = write_inputs(shared_data, paths.stage("filter"), n_text=4, n_image=2)
    shutil.copytree(questions, paths.questions)
    statistics = statistics_of(accepted, tmp_path)
    shutil.copytree(tmp_path / "verdicts", paths.verdicts)
    storage.write_json(paths.stats, statistics)

    def run() -> str:
        result = run_stage(ReportStage(paths), LocalExecutor(progress=False))
        raise_for_failures(result)
        assert result.outcomes["all"].counts["samples"] == 24
        return result.outcomes["all"].state

    md = Path(paths.report) / "report.md"
    assert run() == "COMPLETED"
    first = md.stat().st_mtime_ns
    assert run() == "REUSED" and md.stat().st_mtime_ns == first
    storage.write_json(paths.stats, json.loads(json.dumps(statistics)) | {"note": 1})  # new statistics
    assert run() == "COMPLETED" and md.stat().st_mtime_ns > first
    second = md.stat().st_mtime_ns
    verdicts = storage.Dataset(paths.verdicts)
    verdicts.write_shard("00000", verdicts.read_shard("00000"))  # a re-filtered shard
    assert run() == "COMPLETED" and md.stat().st_mtime_ns > second
    assert run() == "REUSED"
    embedded = embedded_run_report(paths)
    assert "data:image/png;base64," in embedded and "| medqa | 16 | 12 | 4 | 0 | 0.75 |" in embedded
