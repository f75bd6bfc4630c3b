"""Fast tier: the run id a flow run derives (a Retry resumes it), run ids refused before Prefect
starts, one retry of a service start on a busy machine, and the summary card of a big run."""

from __future__ import annotations

import csv
import datetime as dt
import io
import subprocess
import sys
import uuid

import pytest

from octomed_data.layout import RunPaths
from octomed_data.runs import check_run_id


def test_a_flow_runs_run_id_is_the_same_on_every_retry_and_a_valid_run_id() -> None:
    from flows.naming import flow_run_run_id

    fr = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
    created = dt.datetime(2026, 12, 7, 2, 3, 4, tzinfo=dt.UTC)
    first = flow_run_run_id("factory", fr, created)
    assert first == "factory-20261207T020304-0f1e2d3c"
    assert flow_run_run_id("factory", str(fr), created) == first  # the same flow run, retried
    assert check_run_id(first) == first
    other = flow_run_run_id("factory", uuid.UUID("1f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), created)
    assert other != first  # another flow run is another run
    # A timezone other than UTC names the same instant; a recipe name with odd characters is made safe.
    later = created.astimezone(dt.timezone(dt.timedelta(hours=5)))
    assert flow_run_run_id("factory", fr, later) == first
    odd = flow_run_run_id("my recipe/../x", fr, created)
    assert check_run_id(odd) == odd and "/" not in odd and ".." not in odd.split("-")[0]


def test_outside_a_flow_run_nothing_is_derived_or_renamed() -> None:
    from flows.naming import derived_run_id, label_flow_run

    assert derived_run_id("factory") is None
    assert label_flow_run("x") is False


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "demo", "--run-id", "../x"],
        ["run", "demo", "--run-id", "a/b"],
        ["run", "demo", "--run-id", ""],
        ["demo", "--run-id", "../x"],
        ["rerun", "../x", "--shard", "0"],
        ["run", "demo", "--run-id", "x" * 200],
    ],
)
def test_an_invalid_run_id_is_one_line_and_exit_2_before_prefect_starts(argv, capsys, monkeypatch) -> None:
    import flows.startup
    from cli import main

    def no_prefect() -> None:
        raise AssertionError("Prefect was started for an invalid run id")

    monkeypatch.setattr(flows.startup, "ensure_prefect_api", no_prefect)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: invalid run id"), err
    assert "Traceback" not in "\n".join(err)


def test_a_service_start_that_times_out_is_cleaned_up_and_tried_once_more(caplog) -> None:
    from flows.startup import with_retry

    calls: list[str] = []

    def flaky() -> str:
        calls.append("start")
        if calls.count("start") == 1:
            raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.\nmore")
        return "up"

    assert with_retry(flaky, lambda: calls.append("undo"), "the embedded Prefect API") == "up"
    assert calls == ["start", "undo", "start"]
    (line,) = [r.getMessage() for r in caplog.records if "did not start" in r.getMessage()]
    assert "the embedded Prefect API did not start (try 1 of 2): Timed out" in line and "\n" not in line

    def dead() -> None:
        calls.append("dead")
        raise RuntimeError("The current node timed out during startup.")

    calls.clear()
    with pytest.raises(RuntimeError, match="timed out during startup"):
        with_retry(dead, lambda: calls.append("undo"), "local Ray")
    assert calls == ["dead", "undo", "dead"]  # one retry, then the error


def test_local_ray_that_fails_to_start_is_shut_down_and_started_again(monkeypatch) -> None:
    import ray

    import flows.startup
    from tasks.ray_executor import RayPool

    events: list[str] = []
    left: list[subprocess.Popen] = []

    def get(address=None, size=None):
        events.append(f"get {address}")
        if len(events) == 1:  # a half-started node: a process the failed try leaves behind
            left.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "stray-gcs"]))
            raise Exception("The current node timed out during startup.")
        return "pool"

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: events.append("shutdown"))
    monkeypatch.setattr(RayPool, "get", staticmethod(get))
    assert flows.startup.connect_ray(None) == "pool"
    assert events == ["get None", "shutdown", "get None"]
    assert left[0].wait(timeout=10) == -9  # the failed try's leftover was stopped before the retry
    events.clear()
    with pytest.raises(Exception, match="timed out"):  # a cluster address: no second try here
        flows.startup.connect_ray("ray://10.0.0.1:10001")
    assert events == ["get ray://10.0.0.1:10001"]


def test_busy_machine_limit_is_a_default_an_explicit_setting_wins(monkeypatch) -> None:
    from flows.startup import (
        PREFECT_START_TIMEOUT_S,
        PREFECT_TIMEOUT_ENV,
        busy_machine_defaults,
        prefect_start_timeout,
    )

    monkeypatch.delenv(PREFECT_TIMEOUT_ENV, raising=False)
    busy_machine_defaults()
    assert prefect_start_timeout() == PREFECT_START_TIMEOUT_S >= 60
    monkeypatch.setenv(PREFECT_TIMEOUT_ENV, "200")
    busy_machine_defaults()
    assert prefect_start_timeout() == 200


def _rows(n: int, failed: set[int]) -> list[dict]:
    return [
        {
            "stage": "distill",
            "shard": f"src-{i:05d}",
            "state": "FAILED" if i in failed else "COMPLETED",
            "error": "teacher 'x' unreachable | for 130 s" if i in failed else None,
            "attempt": 3 if i in failed else 1,
            "seconds": 1.5,
            "questions": 10,
            "samples": 20,
        }
        for i in range(n)
    ]


def test_a_big_runs_shard_card_is_a_summary_per_stage_with_the_failed_shards(tmp_path) -> None:
    from octomed_data.shard_table import FAILED_ROWS, shard_summary_markdown, shard_table_csv

    paths = RunPaths(str(tmp_path), "big")
    rows = _rows(1000, failed={7, 500}) + [
        {"stage": "filter", "shard": "src-00000", "state": "COMPLETED", "samples": 20, "accepted": 15}
    ]
    md = shard_summary_markdown(paths, rows, "s3://bucket/runs/big/report/shards.csv")
    assert "1001 shards" in md and "## distill: 1000 shards" in md and "## filter: 1 shards" in md
    assert "| COMPLETED | 998 |" in md and "| FAILED | 2 |" in md
    assert "| questions | 10,000 |" in md and "| samples | 20,000 |" in md and "| seconds | 1,500.0 |" in md
    assert "| accepted | 15 |" in md
    assert "## Failed shards: 2" in md and "src-00007" in md and "src-00500" in md
    assert "src-00008" not in md  # only the failed shards are listed
    assert "unreachable \\| for 130 s" in md  # a '|' in an error does not break the table
    assert "(s3://bucket/runs/big/report/shards.csv)" in md
    assert len(md) < 5_000  # a summary, not the table
    many = shard_summary_markdown(paths, _rows(400, failed=set(range(400))), str(tmp_path / "t.csv"))
    assert f"and {400 - FAILED_ROWS} more" in many and f"(file://{tmp_path}/t.csv)" in many
    table = list(csv.DictReader(io.StringIO(shard_table_csv(rows).decode())))
    assert len(table) == 1001 and table[7]["state"] == "FAILED" and table[-1]["accepted"] == "15"


def test_a_big_runs_shard_table_reads_the_records_one_at_a_time(tmp_path, monkeypatch) -> None:
    """Issue 26: the shard table of a run past the table size (the dashboard's card, the run
    report) never holds the run's records (at 10,000 shards the records and rows held at once
    were ~45 MB of the driver); it writes the same summary and the full CSV table."""
    import octomed_data.shard_table as st
    from octomed_data.report import report_markdown, sample_stats

    class Record(dict):
        alive = most = 0

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            Record.alive += 1
            Record.most = max(Record.most, Record.alive)

        def __del__(self) -> None:
            Record.alive -= 1

    n = 2_000
    rows = _rows(n, failed={5, 1500})
    asked: list = []

    def records(paths, stage=None):
        asked.append(stage)
        for row in rows:
            yield Record(row)

    monkeypatch.setattr(st, "iter_shard_states", records)
    paths = RunPaths(str(tmp_path), "big")
    table = st.shard_table(paths, "distill")
    assert asked == ["distill"] and table.total == n and table.rows == [] and table.summary is not None
    assert Record.most <= st.SHARD_TABLE_ROWS + 2, Record.most  # was every record at once: n
    assert table.table_uri == paths.shard_table("distill")
    with open(table.table_uri, encoding="utf-8") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["shard"] for r in csv_rows] == [r["shard"] for r in rows]
    assert csv_rows[5]["state"] == "FAILED" and csv_rows[5]["error"] == rows[5]["error"]
    card = table.summary.markdown(table.table_uri, "Shards of run `big`")
    assert card == st.shard_summary_markdown(paths, rows, table.table_uri)  # the same as from a list
    assert "| FAILED | 2 |" in card and "| questions | 20,000 |" in card and "src-01500" in card
    # The run report shows the summary under its Shards heading, not 2,000 table rows.
    report = report_markdown(run_id="big", stats=sample_stats({}), shards=table)
    assert "## Shards" in report and "### distill: 2000 shards" in report and "src-00006" not in report
    rows[:] = rows[:3]  # up to SHARD_TABLE_ROWS shards: the rows themselves
    small = st.shard_table(paths, "filter")
    assert small.summary is None and [r["shard"] for r in small.rows] == [
        "src-00000",
        "src-00001",
        "src-00002",
    ]
