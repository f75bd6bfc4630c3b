"""The ``decontaminate`` and ``registry`` commands, end to end through ``octomed-data``."""

from __future__ import annotations

import cli
from tests.support.decontam_rows import write_mixed_questions


def test_cli_end_to_end(medqa, tmp_path, capsys):
    src = str(tmp_path / "q")
    write_mixed_questions(src, medqa)
    idx = str(tmp_path / "index.npz")
    assert cli.main(["registry", "index", "--out", idx]) == 0
    out = str(tmp_path / "out")
    assert cli.main(["decontaminate", src, "--out", out, "--index", idx, "-q"]) == 0
    printed = capsys.readouterr().out
    assert "questions: 120  kept: 90  removed: 30" in printed
    assert "removed for medqa: 30" in printed and f"removed -> {out}/removed" in printed
    assert cli.main(["registry", "show"]) == 0
    shown = capsys.readouterr().out
    assert "pathvqa" in shown and "6761" in shown and "25663" in shown  # + imaging_cls_lab (4)
    # User errors: one line, exit 2.
    assert cli.main(["decontaminate", str(tmp_path / "nowhere"), "--out", out, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no committed question shards") and err.count("\n") == 1
    assert (
        cli.main(["decontaminate", src, "--out", out, "--registry", str(tmp_path / "x.parquet"), "-q"]) == 2
    )
    assert "registry pack not found" in capsys.readouterr().err
