"""The decontaminate stage: counts with decontamination on and off, and an index that follows its settings."""

from __future__ import annotations

from octomed_data import storage
from octomed_data.layout import RunPaths
from octomed_data.stages import LocalExecutor, run_stage
from octomed_data.stages.decontaminate import DecontaminateStage
from octomed_data.stages.ingest import ingest


def _ingested(shared_data, tmp_path) -> RunPaths:
    """Real MedQA test items (all contaminated) plus PathVQA textbook pairs (clean)."""
    paths = RunPaths(str(tmp_path / "store"), "r")
    out = paths.stage("ingest")
    src = tmp_path / "medqa.jsonl"
    with open(shared_data / "medqa" / "phrases_no_exclude_test.jsonl", encoding="utf-8") as fh:
        src.write_text("".join(line for _, line in zip(range(6), fh, strict=False)))
    ingest("medqa", str(src), out, shard_prefix="medqa", shard_size=3)
    return paths


def test_counts_on_and_off_and_the_index_follows_its_settings(shared_data, tmp_path) -> None:
    paths = _ingested(shared_data, tmp_path)
    off = run_stage(DecontaminateStage(paths, enabled=False), LocalExecutor())
    assert off.final == {"input": 6, "kept": 6, "removed": 0, "removed_by_benchmark": {}}
    assert {o.counts["kept"] for o in off.outcomes.values()} == {3}

    on_stage = DecontaminateStage(paths)
    on = run_stage(on_stage, LocalExecutor())  # settings changed: every shard runs again
    assert {o.state for o in on.outcomes.values()} == {"COMPLETED"}
    assert on.final["removed"] == 6 and on.final["removed_by_benchmark"] == {"medqa": 6}
    again = run_stage(DecontaminateStage(paths), LocalExecutor())
    assert {o.state for o in again.outcomes.values()} == {"REUSED"} and again.final == on.final
    stamp = storage.read_json(on_stage.index_stamp)

    # Another matching mode: the saved index is rebuilt, not reused with the old settings.
    text_mode = DecontaminateStage(paths, short_match="text")
    text_mode.prepare()
    assert storage.read_json(text_mode.index_stamp)["fingerprint"] != stamp["fingerprint"]
    assert storage.read_json(text_mode.index_stamp)["built_at"] > stamp["built_at"]
