"""The runner at scale: a bounded number of shards in flight with every executor, completion
linear in shards, and a re-run over a finished run answered with a few store requests per shard."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.layout import RunPaths
from octomed_data.stages import LocalExecutor, Stage, run_stage
from octomed_data.stages.runner import DEFAULT_MAX_SHARDS_IN_FLIGHT, drive, shard_limit
from tests.support.store_requests import s3_requests

SCHEMA = pa.schema([("x", pa.int64())])


class CountingStage(Stage):
    """``in`` -> ``out`` (x + 1); counts the shards running at once (threads of one process)."""

    name = "counting"

    def __init__(self, paths: RunPaths, shards: int = 0, hold_s: float = 0.0) -> None:
        super().__init__(paths)
        self.n = shards
        self.hold_s = hold_s
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.ran: list[str] = []

    def input_dataset(self) -> storage.Dataset:
        return storage.Dataset(storage.join(self.paths.root, "in"), SCHEMA)

    def done_dataset(self) -> storage.Dataset:
        return storage.Dataset(storage.join(self.paths.root, "out"), SCHEMA)

    def fingerprint(self) -> str | None:
        return "counting-1"

    def input_shards(self) -> list[str]:
        return [f"{i:05d}" for i in range(self.n)] if self.n else super().input_shards()

    def run_shard(self, shard: str) -> dict[str, Any]:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.ran.append(shard)
        try:
            time.sleep(self.hold_s)
            if self.n:  # no datasets: only the concurrency is looked at
                return {"rows": 0}
            rows = [{"x": r["x"] + 1} for r in self.input_dataset().read_shard(shard).to_pylist()]
            self.done_dataset().write_shard(shard, rows, extra=self.marker_extra(shard, {"rows": len(rows)}))
            return {"rows": len(rows)}
        finally:
            with self.lock:
                self.running -= 1


def test_shard_limit_is_one_setting_and_never_all(monkeypatch) -> None:
    monkeypatch.delenv("OCTOMED_MAX_SHARDS_IN_FLIGHT", raising=False)
    assert shard_limit() == DEFAULT_MAX_SHARDS_IN_FLIGHT == 8
    assert shard_limit(3) == 3 and shard_limit(0) == 8
    monkeypatch.setenv("OCTOMED_MAX_SHARDS_IN_FLIGHT", "5")
    assert shard_limit() == 5 and shard_limit(None) == 5 and shard_limit(12) == 12
    monkeypatch.setenv("OCTOMED_MAX_SHARDS_IN_FLIGHT", "many")
    with pytest.raises(ConfigError, match="OCTOMED_MAX_SHARDS_IN_FLIGHT must be a whole number"):
        shard_limit()


def test_drive_keeps_the_limit_and_each_completion_sees_only_the_shards_in_flight() -> None:
    """20,000 shards, 6 at a time, finishing in random order: never more than 6 started and
    unfinished, the shard list read lazily, and each completion handed at most 6 handles (the
    old loop handed every pending future to each completion: quadratic)."""
    n, limit = 20_000, 6
    rng = random.Random(7)
    started: list[str] = []
    finished: list[str] = []
    seen = {"handles": 0, "calls": 0, "peak": 0}

    def shards():
        for i in range(n):
            assert len(started) - len(finished) <= limit  # read only when a slot is free
            yield f"s{i}"

    def start(shard: str) -> str:
        started.append(shard)
        seen["peak"] = max(seen["peak"], len(started) - len(finished))
        return f"handle-{shard}"

    def next_done(inflight) -> str:
        handles = list(inflight)
        seen["handles"] += len(handles)
        seen["calls"] += 1
        return rng.choice(handles)

    def finish(shard: str, handle: str):
        assert handle == f"handle-{shard}"
        finished.append(shard)
        from octomed_data.stages import ShardOutcome

        return ShardOutcome(shard, "COMPLETED")

    streamed: list[str] = []
    out = drive(shards(), limit, start, next_done, finish, lambda o: streamed.append(o.shard))
    assert len(out) == n and sorted(streamed) == sorted(out) and len(set(started)) == n
    assert seen["peak"] == limit
    assert seen["calls"] == n and seen["handles"] <= limit * n


@pytest.mark.parametrize("workers", [1, 4])
def test_local_executor_runs_at_most_its_workers_at_once(tmp_path: Path, workers: int) -> None:
    stage = CountingStage(RunPaths.at(str(tmp_path / "run")), shards=24, hold_s=0.01)
    result = run_stage(stage, LocalExecutor(workers=workers, progress=False), finalize=False)
    assert sorted(stage.ran) == stage.input_shards()
    assert {o.state for o in result.outcomes.values()} == {"COMPLETED"}
    assert 1 <= stage.peak <= workers
    if workers == 1:
        assert stage.ran == stage.input_shards()  # in order


def test_prefect_executor_default_is_bounded_not_all(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    """No max_in_flight given: the runner's one limit (here 3), not one task per shard at once."""
    from prefect import flow

    from tasks.prefect_executor import PrefectExecutor

    monkeypatch.setenv("OCTOMED_MAX_SHARDS_IN_FLIGHT", "3")
    stage = CountingStage(RunPaths.at(str(tmp_path / "run")), shards=10, hold_s=0.2)

    @flow(name="bounded-shards")
    def bounded():
        return run_stage(stage, PrefectExecutor(), finalize=False)

    result = bounded()
    assert {o.state for o in result.outcomes.values()} == {"COMPLETED"}
    assert sorted(stage.ran) == stage.input_shards()
    assert 2 <= stage.peak <= 3


def write_inputs(root: str, shards: int) -> RunPaths:
    paths = RunPaths.at(root)
    source = storage.Dataset(storage.join(root, "in"), SCHEMA)
    for i in range(shards):
        source.write_shard(f"{i:05d}", [{"x": i}])
    return paths


def test_rerun_of_a_finished_stage_on_s3_makes_few_requests_per_done_shard(s3_bucket: str) -> None:
    """A re-run of a finished stage on s3:// answers every shard from one look at the markers:
    at most 5 store requests per done shard (was ~109 per shard before: each marker read ~15 times)."""
    n = 30
    paths = write_inputs(f"{s3_bucket}/runs/r1", n)
    first = run_stage(CountingStage(paths), LocalExecutor(workers=4, progress=False))
    assert not first.failed and not first.pending and len(first.outcomes) == n
    again = CountingStage(paths)
    with s3_requests(paths.root) as counts:
        result = run_stage(again, LocalExecutor(workers=4, progress=False))
    assert again.ran == [] and {o.state for o in result.outcomes.values()} == {"REUSED"}
    assert result.totals()["rows"] == n and not result.pending and not result.stale
    total = sum(counts.values())
    assert 0 < total <= 5 * n, dict(counts)
    # What a shard that is done costs: its two markers (done and input), read once each.
    assert counts["GetObject"] <= 2 * n + 2, dict(counts)


def test_a_pass_reads_each_marker_once_and_asks_no_marker_again(tmp_path: Path, monkeypatch) -> None:
    """A re-run over a finished stage takes one look per dataset (a listing of each folder, each
    marker read once) and answers every question from it: no per-shard marker read, no manifest."""
    n = 12
    paths = write_inputs(str(tmp_path / "run"), n)
    first = run_stage(CountingStage(paths), LocalExecutor(workers=2, progress=False))
    assert not first.failed and not first.pending
    calls: dict[str, int] = {"shard_info": 0, "manifest": 0}
    for name in calls:
        orig = getattr(storage.Dataset, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(storage.Dataset, name, counted)
    read: list[str] = []
    fs_cat = type(storage.filesystem(paths.root)[0]).cat

    def cat(self, path, *a, **kw):
        read.extend(path if isinstance(path, list) else [path])
        return fs_cat(self, path, *a, **kw)

    monkeypatch.setattr(type(storage.filesystem(paths.root)[0]), "cat", cat)
    again = CountingStage(paths)
    result = run_stage(again, LocalExecutor(workers=2, progress=False))
    assert again.ran == [] and {o.state for o in result.outcomes.values()} == {"REUSED"}
    assert result.totals()["rows"] == n and not result.pending
    assert calls == {"shard_info": 0, "manifest": 0}
    markers = [p for p in read if "_manifest" in p]
    assert len(markers) == 2 * n and len(set(markers)) == 2 * n  # done and input markers, once each
    # Outside a pass the same questions read the store directly, with the same answers.
    assert all(again.is_done(s) for s in again.input_shards())
    assert calls["shard_info"] > 0


def test_a_rerun_of_a_finished_distill_and_filter_on_s3_costs_at_most_5_requests_per_shard(
    s3_bucket: str,
) -> None:
    """Issue 26: the whole re-run (distill, then the filter, each with its finalize) of a finished
    run on s3:// costs at most 5 store requests per shard: the shard loops answer from one look at
    the markers, and the statistics and cost passes see that their inputs are the ones their last
    outputs summarised (``basis``) and read no shard again. A re-committed shard makes them redo."""
    from octomed_data.sandbox import start_sandbox
    from octomed_data.stages.distill_run import run_local
    from tests.support.distill import config, make_questions

    n = 20  # a few requests per pass are fixed (configs, stats.json, cost.json): not per shard
    q_uri, out = f"{s3_bucket}/rerun/q", f"{s3_bucket}/rerun/out"
    for s in range(n):
        make_questions(q_uri, 2, shard=f"{s:05d}", offset=2 * s)
    with start_sandbox() as sb:
        cfg = config(sb.base_url, samples=1)
        first = run_local(q_uri, out, cfg, progress=False)
        assert first["complete"], first
        stats_before = storage.read_json(f"{out}/stats.json")
        with s3_requests(out) as counts:
            again = run_local(q_uri, out, cfg, progress=False)
        assert again["complete"] and sb.stats()["requests"] == 2 * n  # nothing asked again
        # One shard of the run asked again: its raw marker read alone, not the run's every marker.
        with s3_requests(out) as one:
            single = run_local(q_uri, out, cfg, shards=["00003"], progress=False)
        assert single["complete"] and single["asked"] == 1 and sb.stats()["requests"] == 2 * n
        assert [r["shard"] for r in single["shards"]] == ["00003"] and single["stored"] == 2
        # the two passes' looks (questions and raw; raw and verdicts) read every marker; no fifth look
        assert one["GetObject"] <= 4 * n + 5, dict(one)
    assert sum(counts.values()) <= 5 * n * 2, dict(counts)  # two stages of n shards each
    # Each done shard's markers are read once per look (questions, raw twice, verdicts: ~100 GETs;
    # the questions dataset's names come from its listings alone), no existence asked per shard.
    assert counts["GetObject"] <= 5 * n + 5 and counts["HeadObject"] <= 5, dict(counts)
    # and no listing's per-object details kept for the process's life (s3fs's dircache: ~1 KB
    # an object; it held every listed marker and data file, 8 folders and 164 objects here).
    fs, _ = storage.filesystem(out)
    assert sum(len(v) for v in fs.dircache.values()) < n, {k: len(v) for k, v in fs.dircache.items()}
    assert storage.read_json(f"{out}/stats.json") == stats_before and stats_before.get("basis")
    # A verdicts shard committed again: the statistics pass runs again (a new basis).
    verdicts = storage.Dataset(f"{out}/verdicts")
    verdicts.write_shard("00000", verdicts.read_shard("00000"), extra=verdicts.shard_info("00000").extra)
    from octomed_data.stages.filter import FilterStage

    stage = FilterStage(RunPaths.at(out), raw=f"{out}/raw", questions=q_uri, out=out)
    redone = run_stage(stage, LocalExecutor(progress=False)).final
    assert not redone.get("reused") and redone["stats"]["basis"] != stats_before["basis"]


def test_a_first_pass_on_a_local_store_scans_no_big_folder_per_shard(tmp_path: Path, monkeypatch) -> None:
    """Issue 26, 10,000 shards: a pass must not list ``state/<stage>/`` (a few files per shard) or a
    dataset's folders once per shard or per write (a scan of 30,000 entries took 20 ms: quadratic
    in shards). Leases find their claims by name; a write's look for dead writers' temp files
    scans a big folder only once in a while (``files.scan_due``); small folders on every write."""
    import os
    import sys

    from octomed_data.storage import files as files_module
    from octomed_data.storage import scans as scan_memo

    n = 60
    paths = write_inputs(str(tmp_path / "run"), n)
    monkeypatch.setattr(scan_memo, "SMALL_FOLDER", 20)  # "big" from 20 entries on, here
    monkeypatch.setattr(scan_memo, "SCAN_EVERY_S_PER_ENTRY", 10.0)
    scan_memo.forget_scans()
    scans: list[tuple[str, int]] = []
    real_scandir = os.scandir

    class Listed(list):
        def __enter__(self):
            return iter(self)

        def __exit__(self, *exc):
            return False

    def scandir(path="."):
        entries = Listed(real_scandir(path))
        if sys._getframe(1).f_code.co_filename == files_module.__file__:  # the storage layer's scans
            scans.append((os.path.abspath(path), len(entries)))
        return entries

    monkeypatch.setattr(os, "scandir", scandir)
    prefixed: list[str] = []
    real_prefixed = storage.list_prefixed
    monkeypatch.setattr(storage, "list_prefixed", lambda uri: prefixed.append(uri) or real_prefixed(uri))
    stage = CountingStage(paths)
    result = run_stage(stage, LocalExecutor(workers=4, progress=False))
    assert not result.failed and not result.pending and len(stage.ran) == n
    assert prefixed == []  # no lease lists its folder
    big: dict[str, int] = {}
    for folder, entries in scans:
        if entries > 20:
            big[folder] = big.get(folder, 0) + 1
    state = os.path.abspath(paths.state_uri(stage.name, "00000").rsplit("/", 1)[0])
    assert len(os.listdir(state)) >= 2 * n  # a record and a lease (and its claim) per shard
    # Each big folder: its first scan past 20 entries and the pass's cleaner (drop_stale): not per shard.
    assert big and all(count <= 2 for count in big.values()), big
    # Dead writers' temp files are still found: a small folder at once, a big one once it is due.
    host = files_module.temp_name("x").split("~")[2]
    dead = 2**22 + 12345
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except OSError:
            dead += 1
    leftover = os.path.join(state, f".00001.json~{dead}~{host}~ab12.tmp")
    Path(leftover).write_bytes(b"{")
    storage.write_json(paths.state_uri(stage.name, "00001"), {"state": "COMPLETED"})
    assert Path(leftover).exists()  # the folder was scanned a moment ago
    monkeypatch.setattr(scan_memo, "SCAN_EVERY_S_PER_ENTRY", 0.0)
    storage.write_json(paths.state_uri(stage.name, "00001"), {"state": "COMPLETED"})
    assert not Path(leftover).exists()


def test_a_pass_asks_for_the_failed_shards_a_few_times_not_once_per_shard(
    tmp_path: Path, monkeypatch
) -> None:
    """``StageResult.failed`` is built over every outcome: run_stage asked it once per input shard
    (a 10,000-shard re-run took 12 s instead of ~1: quadratic). Now a few times per pass."""
    from octomed_data.stages import StageResult

    asked = [0]
    real = StageResult.failed.fget

    def failed(self):
        asked[0] += 1
        return real(self)

    monkeypatch.setattr(StageResult, "failed", property(failed))
    n = 60
    paths = write_inputs(str(tmp_path / "run"), n)
    result = run_stage(CountingStage(paths), LocalExecutor(workers=2, progress=False))
    assert len(result.outcomes) == n and not result.pending
    assert asked[0] <= 3, asked[0]


def test_a_stages_shards_asked_outside_a_look_hold_no_marker(tmp_path: Path, monkeypatch) -> None:
    """Issue 26: a stage's shard names asked outside a pass's look (``Stage.select`` in a flow
    before the pass) read the markers one at a time and keep only the names: holding every
    parsed marker (~4 KB a distill marker) was most of a 10,000-shard re-run's growth through
    Prefect. Inside a look they come from two listings, with no marker read at all."""
    import weakref

    n = 40
    paths = write_inputs(str(tmp_path / "run"), n)
    stage = CountingStage(paths)
    alive, most, made = [0], [0], [0]
    parse = storage.Dataset._info

    def info(uri, data):
        parsed = parse(uri, data)
        alive[0] += 1
        made[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(parsed, lambda: alive.__setitem__(0, alive[0] - 1))
        return parsed

    monkeypatch.setattr(storage.Dataset, "_info", staticmethod(info))
    assert stage.select(None) == [f"{i:05d}" for i in range(n)]
    assert made[0] == n and most[0] <= 2, (made, most)  # every marker read, one held at a time
    made[0] = 0
    with stage.viewing():
        assert stage.select(None) == [f"{i:05d}" for i in range(n)]
    assert made[0] == 0
