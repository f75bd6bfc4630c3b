"""Issue 26: a pass's memory flat in shards. A re-run of a finished stage holds, per shard, only
its outcome kept compactly (:class:`~octomed_data.stages.outcomes.Outcomes`) and its markers
packed in the pass's look (:class:`~octomed_data.stages.markers.MarkerView`); readers of the
result see the same dict of :class:`ShardOutcome` as before."""

from __future__ import annotations

import json
import os
import pickle
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow as pa

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.stages import LocalExecutor, ShardOutcome, Stage, StageResult, run_stage
from octomed_data.stages.markers import MarkerView, Packer
from octomed_data.stages.outcomes import Outcomes

SCHEMA = pa.schema([("x", pa.int64())])


class ReportingStage(Stage):
    """``in`` -> ``out``, each done marker carrying counts (nested too) and a report, as the
    distill and filter markers do (~1 KB of JSON a marker)."""

    name = "reporting"

    def input_dataset(self) -> storage.Dataset:
        return storage.Dataset(storage.join(self.paths.root, "in"), SCHEMA)

    def done_dataset(self) -> storage.Dataset:
        return storage.Dataset(storage.join(self.paths.root, "out"), SCHEMA)

    def fingerprint(self) -> str | None:
        return "reporting-1"

    def run_shard(self, shard: str) -> dict[str, Any]:
        counts = shard_counts(int(shard))
        report = {f"{k}_{j}": int(shard) * 7 + j for j, k in enumerate(["tokens", "requests", "retries"] * 6)}
        extra = self.marker_extra(shard, counts, report=report | {"uri": self.done_dataset().uri})
        self.done_dataset().write_shard(shard, [{"x": int(shard)}], extra=extra)
        return counts


def shard_counts(i: int) -> dict[str, Any]:
    return {
        "questions": 100 + i % 7,
        "samples": 400 + i,
        "stored": 399 + i,
        "failed": i % 3,
        "rejected": {"wrong_answer": i % 11, "no_answer": i % 5},
        "verified_by": {"exact": 300 + i % 13},
    }


def finished_run(root: Path, shards: int) -> RunPaths:
    """A finished run of ``shards`` shards: shard 0 run for real, the others its copies (their
    own names, numbers and commit times), written as the store writes them."""
    paths = RunPaths.at(str(root))
    stage = ReportingStage(paths)
    stage.input_dataset().write_shard("00000", [{"x": 0}])
    stage.run_shard("00000")
    for folder in ("in", "out"):
        ds = root / folder
        marker = json.loads((ds / storage.MANIFEST_DIR / "00000.json").read_text())
        for i in range(1, shards):
            shard = f"{i:05d}"
            file = marker["file"].replace("00000", shard)
            os.link(ds / marker["file"], ds / file)
            doc = dict(marker, shard=shard, file=file, committed_at=marker["committed_at"] + i)
            if folder == "out":
                report = {
                    k: v + i * 7 if isinstance(v, int) else v for k, v in marker["extra"]["report"].items()
                }
                doc["extra"] = marker["extra"] | {
                    "counts": shard_counts(i),
                    "report": report,
                    "input_committed_at": marker["extra"]["input_committed_at"] + i,
                }
            (ds / storage.MANIFEST_DIR / f"{shard}.json").write_text(
                json.dumps(doc, indent=2, sort_keys=True)
            )
    return paths


def rerun_memory(root: Path, shards: int) -> tuple[int, int, StageResult]:
    """Python bytes a re-run of a finished ``shards``-shard run allocates at its peak, and what
    its result keeps."""
    paths = finished_run(root, shards)
    stage = ReportingStage(paths)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = run_stage(stage, LocalExecutor(workers=2, progress=False))
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert {o.state for o in result.outcomes.values()} == {"REUSED"} and len(result.outcomes) == shards
    assert not result.failed and not result.pending
    return peak - before, now - before, result


def test_a_reruns_memory_per_done_shard_is_small_and_flat(tmp_path: Path) -> None:
    """From 200 to 2,000 done shards, a re-run's Python peak grows by under 1.2 KB a shard (its two
    markers packed, its outcome, the listings' names; ~800 bytes measured) and its result keeps
    under 450 bytes a shard (~230 measured). Before: each marker's whole JSON in the look and a
    dict of counts per outcome, ~2.5 KB a shard at the peak and ~870 bytes kept (+27% driver
    RSS from 1,000 to 10,000 shards in bench_scale)."""
    small_peak, small_kept, _ = rerun_memory(tmp_path / "small", 200)
    big_peak, big_kept, result = rerun_memory(tmp_path / "big", 2000)
    per_shard_peak = (big_peak - small_peak) / 1800
    per_shard_kept = (big_kept - small_kept) / 1800
    assert per_shard_peak < 1200, f"{per_shard_peak:.0f} bytes a shard at the peak"
    assert per_shard_kept < 450, f"{per_shard_kept:.0f} bytes a shard kept in the result"
    # What readers see is what the markers say, shard by shard.
    assert result.outcomes["01234"] == ShardOutcome("01234", "REUSED", shard_counts(1234))
    totals = result.totals()
    assert totals["samples"] == sum(400 + i for i in range(2000)) and "rejected" not in totals


def test_outcomes_behave_as_the_dict_they_replace() -> None:
    plain = {
        "b": ShardOutcome("b", "REUSED", {"rows": 3, "by": {"x": 1}}),
        "a": ShardOutcome("a", "COMPLETED", {"rows": 2, "ok": True, "ratio": 0.5}, seconds=1.25),
        "c": ShardOutcome("c", "FAILED", error="ValueError: bad"),
        "d": ShardOutcome("d", "REUSED"),
        "e": ShardOutcome("e", "COMPLETED", {"pair": (1, 2)}),  # not plain JSON: kept as it is
    }
    kept = Outcomes(plain)
    assert kept == plain and plain == kept and list(kept) == list(plain) and len(kept) == 5
    assert dict(kept.items()) == plain and list(kept.values()) == list(plain.values())
    assert kept["e"] is plain["e"] and kept["e"].counts["pair"] == (1, 2)
    assert kept.failed() == {"c": "ValueError: bad"} and "c" in kept and "z" not in kept
    assert kept.get("z") is None and kept.get("a") == plain["a"]
    kept["a"] = ShardOutcome("a", "FAILED", error=None)  # replaced in place: order kept
    assert list(kept) == list(plain) and kept.failed() == {"a": "failed", "c": "ValueError: bad"}
    more = {"f": ShardOutcome("f", "REUSED", {"rows": 1})}
    assert list(kept | more) == [*plain, "f"] and list(more | kept) == ["f", *plain]
    assert isinstance(kept | more, Outcomes) and isinstance(more | kept, Outcomes)
    copy = Outcomes(kept)
    copy.update(more, g=ShardOutcome("g", "REUSED"))
    assert list(copy) == [*plain, "f", "g"] and list(kept) == list(plain)
    del copy["g"]
    assert "g" not in copy and pickle.loads(pickle.dumps(copy)) == copy
    result = StageResult("s", outcomes=Outcomes(plain))
    as_dict = StageResult("s", outcomes=dict(plain))
    assert result.failed == as_dict.failed and result.totals() == as_dict.totals() == {"rows": 5}
    assert result.to_dict() == as_dict.to_dict()
    assert json.loads(json.dumps(result.to_dict()))["shards"]["b"]["counts"] == {"rows": 3, "by": {"x": 1}}


def test_a_look_packs_each_marker_and_answers_what_the_store_says(tmp_path: Path) -> None:
    paths = finished_run(tmp_path, 40)
    done = ReportingStage(paths).done_dataset()
    view = MarkerView(done)
    assert view.names() == sorted(done.manifest()) and len(view.names()) == 40
    for shard in ("00000", "00007", "00039"):
        assert view.shard_info(shard) == done.shard_info(shard)
    assert view.shard_info("00040") is None
    packed = view.infos()
    whole = sum(len(json.dumps(vars(done.shard_info(s)), separators=(",", ":"))) for s in packed)
    assert sum(map(len, packed.values())) < whole / 3  # deflated against the first marker
    packer = Packer()
    docs = [{"a": 1, "b": [1, 2, {"c": None}], "t": "x" * 5000}, {"a": 2.5, "b": [], "t": "é"}, {}]
    assert [packer.unpack(packer.pack(d)) for d in docs] == docs
