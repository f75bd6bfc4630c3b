"""The verifier's LLM judge end to end on the bundled open VQA / open QA sample data, with the
sandbox judge on loopback: verdicts, MCQ calibration in stats.json, journal/resume after a kill,
re-judging on a changed fingerprint, retry of failed judgements, no key in any output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from octomed_data import storage
from octomed_data.distill.journal import segment_uris
from octomed_data.layout import FilterFolder, RunPaths
from octomed_data.report import report_markdown, sample_stats
from octomed_data.sandbox import FaultConfig, start_sandbox
from octomed_data.schema import VERDICT_SCHEMA
from octomed_data.stages import LocalExecutor, run_stage
from octomed_data.stages.distill import DistillStage
from octomed_data.stages.filter import FilterStage
from octomed_data.stages.ingest import ingest_many
from octomed_data.teachers import DistillConfig, TeacherConfig
from octomed_data.verify import VerifySettings, is_open
from octomed_data.verify.calibration import Calibration
from octomed_data.verify.judge import iter_judgements

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "octomed_data" / "sample_data"
KEY = "sk-judge-DO-NOT-LEAK-93b1c7aa40"
# pathvqa textbook pairs (open_qa + yes/no), VQA-RAD (open_vqa + yes/no, with images), MedQA (MCQ).
SETTINGS = VerifySettings(
    sources={"pathvqa": "judge", "vqa_rad": "judge", "medqa": {"calibrate": True}},
    calibration_samples=12,
)
JUDGE_FAULTS = dict(judge_error=0.2, unparseable=0.05, seed=3)


def judge_teacher(base_url: str, model: str = "sandbox-judge") -> TeacherConfig:
    return TeacherConfig(name="judge", base_url=base_url, model=model, temperature=0.0, max_in_flight=4)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> Path:
    """Real sample questions ingested and distilled (2 sandbox replies each): ``ingest/``, ``distill/``."""
    root = tmp_path_factory.mktemp("verify")
    entries = [
        {"format": "pathvqa", "input": str(SAMPLE / "pathvqa/QA_pairs_vb.sample80.json"), "name": "pathvqa"},
        {
            "format": "vqa_rad",
            "input": str(SAMPLE / "vqa_rad/VQA_RAD_Dataset_Public.train_sample.json"),
            "images": str(SAMPLE / "vqa_rad/images"),
            "name": "vqa_rad",
        },
        {
            "format": "medqa",
            "input": str(SAMPLE / "medqa/phrases_no_exclude_test.head8.jsonl"),
            "name": "medqa",
        },
    ]
    ingest_many(entries, str(root / "ingest"))
    with start_sandbox() as sandbox:
        config = DistillConfig(
            teachers=[
                TeacherConfig(
                    name="sandbox",
                    base_url=sandbox.base_url,
                    model="sandbox-r1",
                    modalities=["text", "image"],
                )
            ],
            samples=2,
            flush_interval_s=0.05,
        )
        out = str(root / "distill")
        stage = DistillStage(
            RunPaths.at(out),
            config,
            questions=str(root / "ingest/questions"),
            out=out,
            api_keys={"sandbox": KEY},
        )
        result = run_stage(stage, LocalExecutor(progress=False), finalize=False)
        assert not result.failed
    return root


def filter_stage(root: Path, out: Path, judge: TeacherConfig | None, settings=SETTINGS) -> FilterStage:
    return FilterStage(
        RunPaths.at(str(out)),
        raw=str(root / "distill/raw"),
        questions=str(root / "ingest/questions"),
        out=str(out),
        verify=settings,
        judge=judge,
        api_keys={"judge": KEY} if judge is not None else None,
    )


def verdict_rows(out: Path) -> list[dict]:
    ds = storage.Dataset(FilterFolder(str(out)).verdicts, VERDICT_SCHEMA)
    rows = [r for b in ds.iter_batches() for r in b.to_pylist()]
    return sorted(rows, key=lambda r: (r["question_id"], r["sample_idx"]))


def judge_requests(sandbox) -> int:
    return sum(1 for e in sandbox.stats()["log"] if e["kind"] == "judge")


def journalled(out: Path) -> list[dict]:
    journal = FilterFolder(str(out)).judge
    shards = (
        [p.name for p in (Path(journal) / "_journal").iterdir()]
        if (Path(journal) / "_journal").exists()
        else []
    )
    return [r for s in sorted(shards) for r in iter_judgements(journal, s)]


def test_judge_verifies_open_answers_and_reports_calibration(distilled: Path, tmp_path: Path) -> None:
    with start_sandbox(faults=FaultConfig(**JUDGE_FAULTS)) as sandbox:
        stage = filter_stage(distilled, tmp_path, judge_teacher(sandbox.base_url))
        result = run_stage(stage, LocalExecutor(progress=False))
        assert not result.failed, result.failed
        requests = judge_requests(sandbox)
    rows = verdict_rows(tmp_path)
    records = journalled(tmp_path)
    # One judge request per judgement, each journalled once.
    assert requests == len(records) == len({r["key"] for r in records})
    open_rows = [r for r in rows if is_open(r["task_type"]) and r["verifier"]]
    assert {r["source"] for r in open_rows} == {"pathvqa", "vqa_rad"}
    assert Counter(r["task_type"] for r in open_rows).keys() == {"open_qa", "open_vqa"}
    judged = [r for r in open_rows if r["verifier"] == "judge"]
    assert judged and all(r["verifier"] in ("normalized", "judge") for r in open_rows)
    unparsed = [r for r in judged if r["reject_reason"] == "judge_unparsed"]
    assert unparsed and all(r["judge_correct"] is None and not r["correct"] for r in unparsed)
    for r in judged:  # the judge decides: its verdict is the row's
        if r not in unparsed:
            assert r["correct"] == r["judge_correct"]
            assert (r["reject_reason"] is None) == r["correct"]
    assert len(judged) == sum(1 for r in records if r["purpose"] == "open")
    # Calibration: closed replies of judge / calibrate sources, at most N per source per shard,
    # verdict still exact match's.
    cal_rows = [r for r in rows if not is_open(r["task_type"]) and r["judge_correct"] is not None]
    per_source = Counter(r["source"] for r in cal_rows)
    assert set(per_source) == {"pathvqa", "vqa_rad", "medqa"}
    assert all(n <= SETTINGS.calibration_samples for n in per_source.values())
    assert all(r["verifier"] == "exact" for r in cal_rows)
    # stats.json's calibration is recomputed here from the rows.
    stats = storage.read_json(stage.stats_uri)
    expected: dict[str, Calibration] = {}
    for r in cal_rows:
        expected.setdefault(r["source"], Calibration()).add(r["correct"], r["judge_correct"])
    overall = Calibration()
    for c in expected.values():
        overall.merge(c)
    calibration = stats["verifier"]["calibration"]
    assert calibration == {s: c.summary() for s, c in expected.items()} | {"overall": overall.summary()}
    # The sandbox judge errs on about 20% of keys: both kinds of disagreement are measurable.
    o = calibration["overall"]
    assert o["fp"] + o["fn"] > 0 and o["tp"] > 0 and o["tn"] > 0 and 0 < o["precision"] < 1
    by = stats["verifier"]["verified_by"]
    assert by["vqa_rad"]["judge"] == sum(1 for r in judged if r["source"] == "vqa_rad")
    cost = stats["verifier"]["judge_cost"]
    assert cost["journalled"] == len(records)
    assert cost["prompt_tokens"] == sum(r["prompt_tokens"] for r in records) > 0
    # The run report shows the calibration table.
    md = report_markdown(run_id="t", stats=sample_stats(stats))
    assert "LLM judge calibration" in md and "| overall |" in md
    # No key anywhere in what the stage wrote.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


_CHILD = """
import json, sys
from octomed_data.layout import FilterFolder
from octomed_data.rejection import filter_shard
from octomed_data.verify import VerifySettings
from octomed_data.verify.judge import JudgeEndpoint
from octomed_data.teachers import TeacherConfig
from pydantic import SecretStr
a = json.loads(sys.argv[1])
teacher = TeacherConfig(**a["teacher"])
ep = JudgeEndpoint(teacher, SecretStr(a["key"]), FilterFolder(a["out"]).judge, flush_every=2, flush_interval_s=0.02)
folder = FilterFolder(a["out"])
filter_shard(a["raw"], a["questions"], a["shard"], folder.verdicts, folder.accepted,
             verify=VerifySettings(**a["settings"]), judge_endpoint=ep)
"""


def test_judge_resumes_after_a_kill_without_repeating_a_request(distilled: Path, tmp_path: Path) -> None:
    shard = "vqa_rad-00000"
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    with start_sandbox(faults=FaultConfig(**JUDGE_FAULTS), latency_s=0.15) as sandbox:
        teacher = judge_teacher(sandbox.base_url).model_copy(update={"max_in_flight": 2})
        # An uninterrupted run: how many judgements the shard needs, and its verdicts.
        run_stage(filter_stage(distilled, reference, teacher), LocalExecutor(progress=False), shards=[shard])
        needed = len(journalled(reference))
        assert needed >= 20
        before = judge_requests(sandbox)
        assert before == needed
        args = {
            "teacher": teacher.model_dump(),
            "key": KEY,
            "out": str(resumed),
            "raw": str(distilled / "distill/raw"),
            "questions": str(distilled / "ingest/questions"),
            "shard": shard,
            "settings": SETTINGS.model_dump(),
        }
        env = dict(os.environ, PYTHONPATH=str(REPO))
        child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], env=env)
        journal = FilterFolder(str(resumed)).judge
        deadline = time.monotonic() + 120
        while len(segment_uris(journal, shard)) < 3 and time.monotonic() < deadline:
            assert child.poll() is None, "the child finished before it was killed"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        survived = journalled(resumed)
        assert 0 < len(survived) < needed  # killed mid-way, some judgements durable
        killed_requests = judge_requests(sandbox) - before
        # Resume: only what the journal lacks is requested again.
        stage = filter_stage(distilled, resumed, teacher)
        assert not stage.is_done(shard)
        mark = judge_requests(sandbox)
        result = run_stage(stage, LocalExecutor(progress=False), shards=[shard])
        assert not result.failed
        assert judge_requests(sandbox) - mark == needed - len(survived)
        assert killed_requests >= len(survived)
        # A forced re-run finds every judgement in the journal: no request at all.
        mark = judge_requests(sandbox)
        run_stage(stage, LocalExecutor(progress=False), shards=[shard], force=True)
        assert judge_requests(sandbox) == mark
    assert verdict_rows(resumed) == verdict_rows(reference)
    keys = [r["key"] for r in journalled(resumed)]
    assert len(keys) == len(set(keys)) == needed


def test_changed_settings_rejudge_and_a_new_judge_is_asked_again(distilled: Path, tmp_path: Path) -> None:
    shard = "pathvqa-00000"
    normalized = VerifySettings(sources={"pathvqa": "normalized"})
    with start_sandbox(faults=FaultConfig(**JUDGE_FAULTS)) as sandbox:
        first = filter_stage(distilled, tmp_path, None, normalized)
        run_stage(first, LocalExecutor(progress=False), shards=[shard])
        assert first.is_done(shard)
        assert {r["verifier"] for r in verdict_rows(tmp_path) if r["task_type"] == "open_qa"} - {None} == {
            "normalized"
        }
        assert judge_requests(sandbox) == 0
        # judge mode: a new fingerprint, the shard is judged again
        judged = filter_stage(distilled, tmp_path, judge_teacher(sandbox.base_url))
        assert judged.fingerprint() != first.fingerprint() and not judged.is_done(shard)
        run_stage(judged, LocalExecutor(progress=False), shards=[shard])
        assert judged.is_done(shard)
        n = judge_requests(sandbox)
        assert n > 0
        assert "judge" in {r["verifier"] for r in verdict_rows(tmp_path)}
        # more synonyms: re-judged, but every judgement is already journalled
        more = SETTINGS.model_copy(update={"synonyms": [["histone", "histone protein"]]})
        again = filter_stage(distilled, tmp_path, judge_teacher(sandbox.base_url), more)
        assert not again.is_done(shard)
        run_stage(again, LocalExecutor(progress=False), shards=[shard])
        assert judge_requests(sandbox) == n
        # another judge model: its own judgements, every one requested
        other = filter_stage(distilled, tmp_path, judge_teacher(sandbox.base_url, model="judge-2"))
        assert not other.is_done(shard)
        run_stage(other, LocalExecutor(progress=False), shards=[shard])
        assert judge_requests(sandbox) == 2 * n


def test_failed_judgements_leave_the_shard_uncommitted_and_are_retried(
    distilled: Path, tmp_path: Path
) -> None:
    shard = "vqa_rad-00000"
    # A 500 on the first attempt of about a third of the requests; one attempt allowed.
    faults = FaultConfig(server_error=0.35, max_faults_per_request=1, **JUDGE_FAULTS)
    settings = SETTINGS.model_copy(update={"max_attempts": 1})
    with start_sandbox(faults=faults) as sandbox:
        stage = filter_stage(distilled, tmp_path, judge_teacher(sandbox.base_url), settings)
        result = run_stage(stage, LocalExecutor(progress=False), shards=[shard])
        assert "judge request(s) failed" in result.failed[shard]
        assert not stage.is_done(shard) and not verdict_rows(tmp_path)
        records = journalled(tmp_path)
        failed = [r for r in records if r.get("reject_reason") == "request_failed"]
        ok = {r["key"] for r in records} - {r["key"] for r in failed}
        assert failed and ok
        mark = judge_requests(sandbox)
        result = run_stage(stage, LocalExecutor(progress=False), shards=[shard])
        assert not result.failed and stage.is_done(shard)
        assert judge_requests(sandbox) - mark == len({r["key"] for r in failed})


def test_a_batch_mode_judge_gives_the_online_verdicts_through_the_batch_api(
    distilled: Path, tmp_path: Path
) -> None:
    from octomed_data.sandbox import BatchConfig

    shard = "pathvqa-00000"
    online, batch = tmp_path / "online", tmp_path / "batch"
    with start_sandbox(batch=BatchConfig(complete_after_s=0.2)) as sandbox:
        teacher = judge_teacher(sandbox.base_url)
        run_stage(filter_stage(distilled, online, teacher), LocalExecutor(progress=False), shards=[shard])
        needed = judge_requests(sandbox)
        assert needed == len(journalled(online)) > 0
        batched = teacher.model_copy(update={"mode": "batch", "batch_poll_s": 0.05})
        stage = filter_stage(distilled, batch, batched)
        result = run_stage(stage, LocalExecutor(progress=False), shards=[shard])
        assert not result.failed and stage.is_done(shard)
        stats = sandbox.batch_stats()
        # Every judgement went through the Batch API, none online.
        assert stats["creations"] >= 1 and stats["executed"] == needed
        assert sandbox.stats()["requests"] == needed
        # A forced re-run finds every judgement in the journal: no batch, no request.
        run_stage(stage, LocalExecutor(progress=False), shards=[shard], force=True)
        assert sandbox.batch_stats()["executed"] == needed and sandbox.stats()["requests"] == needed
    assert verdict_rows(batch) == verdict_rows(online)
    records = journalled(batch)
    assert len(records) == needed and all(r["batch_id"] for r in records)
    assert {r["key"] for r in records} == {r["key"] for r in journalled(online)}
