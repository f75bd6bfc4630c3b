"""Ingest end to end: the CLI, shards and manifest, the accounting invariant, duplicates,
re-runs, several inputs into one output, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cli import main
from octomed_data import storage
from octomed_data.errors import ConfigError, OctomedError
from octomed_data.ingest import demo_entries
from octomed_data.schema import QUARANTINE_SCHEMA, QUESTION_SCHEMA
from octomed_data.stages.ingest import ingest, ingest_many

REPO = Path(__file__).resolve().parent.parent


def _rows(uri: str, schema=QUESTION_SCHEMA) -> list[dict]:
    return storage.Dataset(uri, schema).read_all().to_pylist()


def test_cli_ingest_end_to_end(shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "ingest",
            "vqa_rad",
            str(shared_data / "vqa_rad/testset.json"),
            "--out",
            str(out),
            "--images",
            str(shared_data / "vqa_rad/images"),
            "--shard-size",
            "10",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    assert "records: 451  questions: 36  quarantined: 415" in printed
    assert "missing_image=415" in printed and str(out / "questions") in printed
    questions = storage.Dataset(str(out / "questions"), QUESTION_SCHEMA)
    assert list(questions.manifest()) == ["00000", "00001", "00002", "00003"]
    assert [s.rows for s in questions.manifest().values()] == [10, 10, 10, 6]
    table = questions.read_all()
    assert table.schema.equals(QUESTION_SCHEMA, check_metadata=False) and table.num_rows == 36
    assert storage.Dataset(str(out / "quarantine")).num_rows() == 415
    # 12 distinct images stored once each, referenced by 36 questions.
    pngs = list((out / "images").rglob("*.png"))
    assert len(pngs) == 12
    uris = {im["uri"] for row in table.to_pylist() for im in row["images"]}
    assert {Path(u) for u in uris} == set(pngs)
    report = json.loads((out / "ingest.json").read_text())
    assert report["records"] == 451 and report["images_stored"] == 12


def test_accounting_invariant_and_duplicates(shared_data, tmp_path):
    result = ingest(
        "mmlu_pro", str(shared_data / "huatuogpt_o1_eval/MMLU-Pro_Medical_test.json"), str(tmp_path)
    )
    assert result.records == 1535 == result.questions + result.quarantined
    assert result.reasons == {"duplicate": 95}
    quarantined = _rows(result.quarantine_uri, QUARANTINE_SCHEMA)
    questions = _rows(result.questions_uri)
    assert len({q["question_id"] for q in questions}) == 1440
    first = {q["question_id"]: q["record_index"] for q in questions}
    dup = quarantined[0]
    qid = json.loads(dup["raw"])["question_id"]
    assert dup["detail"].endswith(f"#{first[qid]}") and dup["record_index"] > first[qid]


def test_rerun_replaces_and_drops_stale_shards(shared_data, tmp_path):
    src = str(shared_data / "medqa/phrases_no_exclude_test.jsonl")
    first = ingest("medqa", src, str(tmp_path), shard_size=200)
    assert first.shards == [f"{i:05d}" for i in range(7)]
    again = ingest("medqa", src, str(tmp_path), shard_size=500)  # fewer, larger shards
    assert again.shards == ["00000", "00001", "00002"]
    ds = storage.Dataset(first.questions_uri, QUESTION_SCHEMA)
    assert list(ds.manifest()) == again.shards and ds.num_rows() == 1273
    parquet_files = sorted(p.name for p in Path(first.questions_uri).glob("*.parquet"))
    assert parquet_files == [f"part-{s}.parquet" for s in again.shards]
    ids = [r["question_id"] for r in ds.read_all(["question_id"]).to_pylist()]
    assert len(ids) == len(set(ids)) == 1273


def test_independent_ingests_with_prefixes_share_an_output(shared_data, tmp_path):
    a = ingest(
        "medbullets",
        str(shared_data / "medreason_eval/medbullets_op4.jsonl"),
        str(tmp_path),
        shard_prefix="op4",
    )
    b = ingest("mmlu", str(shared_data / "mmlu_medical"), str(tmp_path), shard_prefix="mmlu", shard_size=500)
    assert a.shards == ["op4-00000"] and b.shards == ["mmlu-00000", "mmlu-00001", "mmlu-00002"]
    ds = storage.Dataset(a.questions_uri, QUESTION_SCHEMA)
    # (MMLU's clinical_knowledge and college_medicine share 78 questions: quarantined as duplicates.)
    assert b.reasons == {"duplicate": 78} and ds.num_rows() == a.questions + b.questions == a.questions + 1011
    # Re-running one of them leaves the other's shards alone.
    ingest(
        "medbullets",
        str(shared_data / "medreason_eval/medbullets_op4.jsonl"),
        str(tmp_path),
        shard_prefix="op4",
    )
    assert storage.Dataset(a.questions_uri).num_rows() == a.questions + 1011


def test_ingest_many_demo_entries(tmp_path):
    result = ingest_many(demo_entries(), str(tmp_path), shard_size=40)
    assert result.records == result.questions + result.quarantined == 186
    assert result.per_source["imaging_modality"] == {"records": 16, "questions": 7, "quarantined": 9}
    assert result.per_source["vqa_rad_train"]["records"] == 58
    assert result.reasons["unreadable_image"] == 5 and result.reasons["not_sampled"] == 4
    names = list(storage.Dataset(result.questions_uri).manifest())
    assert "pathvqa_textbook-00000" in names and "pathvqa_textbook-00001" in names
    assert all(n.rsplit("-", 1)[0] in result.per_source for n in names)
    sources = {r["source"] for r in _rows(result.questions_uri)}
    assert sources == {"pathvqa", "imaging", "vqa_rad", "medqa", "medmcqa", "mmlu", "omnimedvqa"}
    assert result.images_stored == len(list((tmp_path / "images").rglob("*.png")))


def test_ingest_many_finds_duplicates_across_entries(shared_data, tmp_path):
    src = str(shared_data / "medreason_eval/medbullets_op4.jsonl")
    result = ingest_many(
        [{"format": "medbullets", "input": src}, {"format": "medbullets", "input": src}], str(tmp_path)
    )
    assert list(result.per_source) == ["medbullets", "medbullets-2"]
    assert result.per_source["medbullets-2"] == {"records": 308, "questions": 0, "quarantined": 308}
    # medbullets_op4 itself repeats 4 questions; the second copy of the file is all duplicates.
    assert result.per_source["medbullets"] == {"records": 308, "questions": 304, "quarantined": 4}
    assert result.reasons == {"duplicate": 312}


def test_ingest_validates_all_entries_before_writing(shared_data, tmp_path):
    good = {"format": "medqa", "input": str(shared_data / "medqa/phrases_no_exclude_test.jsonl")}
    with pytest.raises(OctomedError):
        ingest_many(
            [good, {"format": "medqa", "input": str(tmp_path / "missing.jsonl")}], str(tmp_path / "o")
        )
    with pytest.raises(ConfigError):
        ingest_many(
            [good, {"format": "medqa", "input": good["input"], "options": {"per_class": 2}}],
            str(tmp_path / "o"),
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["ingest", "medqa", "{data}/medqa/missing.jsonl", "--out", "{tmp}/o"],
            "error: input path does not exist",
        ),
        (
            ["ingest", "medqa_v9", "{data}/medqa", "--out", "{tmp}/o"],
            "error: unknown format 'medqa_v9'; known formats: medqa",
        ),
        (
            ["ingest", "mmlu", "{data}/mmlu_medical", "--out", "{tmp}/o", "--option", "per_class"],
            "error: --option expects KEY=VALUE",
        ),
        (
            ["ingest", "mmlu", "{data}/mmlu_medical", "--out", "{tmp}/o", "--option", "k=1"],
            "error: unknown option(s) k",
        ),
        (
            ["ingest", "vqa_rad", "{data}/vqa_rad/testset.json", "--out", "{tmp}/o", "--images", "{tmp}/no"],
            "error: images folder does not exist",
        ),
        (["ingest", "mmlu", "{data}/mmlu_medical", "--out", "/proc/octomed/o"], "error: "),
    ],
)
def test_cli_errors_are_one_line_exit_2(shared_data, tmp_path, capsys, argv, message):
    argv = [a.format(data=shared_data, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert "Traceback" not in err


def test_cli_unreachable_s3_endpoint_subprocess(shared_data, tmp_path):
    """A real process: exit code 2, one error line naming the endpoint problem, no traceback."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "OCTOMED_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "ingest",
            "medqa",
            str(shared_data / "medqa/phrases_no_exclude_test.jsonl"),
            "--out",
            "s3://octomed-bucket/run",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cannot reach the storage endpoint" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "testing" not in proc.stderr


def test_cli_progress_bar_goes_to_stderr(shared_data, tmp_path, capsys):
    assert (
        main(
            [
                "ingest",
                "medbullets",
                str(shared_data / "medreason_eval/medbullets_op5.jsonl"),
                "--out",
                str(tmp_path),
                "--progress",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "308 records" in captured.err and "records: 308" in captured.out


def test_output_shards_are_plain_parquet(shared_data, tmp_path):
    result = ingest("pubmedqa", str(shared_data / "pubmedqa/ori_pqal.json"), str(tmp_path), shard_size=300)
    files = sorted(Path(result.questions_uri).glob("part-*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [300, 300, 300, 100]
    assert pq.read_schema(files[0]).metadata[b"octomed.schema"] == b"question"


def test_replacing_another_inputs_shards_is_announced(shared_data, tmp_path, caplog):
    op4 = str(shared_data / "medreason_eval/medbullets_op4.jsonl")
    op5 = str(shared_data / "medreason_eval/medbullets_op5.jsonl")
    ingest("medbullets", op4, str(tmp_path))
    with caplog.at_level("WARNING", logger="octomed_data.ingest"):
        ingest("medbullets", op4, str(tmp_path))  # a plain re-run: nothing to say
    assert not caplog.records
    with caplog.at_level("WARNING", logger="octomed_data.ingest"):
        second = ingest("medbullets", op5, str(tmp_path))
    assert len(caplog.records) == 1 and f"medbullets:{op4}" in caplog.records[0].getMessage()
    assert storage.Dataset(second.questions_uri).num_rows() == second.questions


def _medqa_lines(shared_data, n: int, skip: int = 0) -> list[str]:
    with open(shared_data / "medqa" / "phrases_no_exclude_test.jsonl", encoding="utf-8") as fh:
        return [line for _, line in zip(range(skip + n), fh, strict=False)][skip:]


def test_cross_entry_duplicates_survive_changes_of_either_entry(shared_data, tmp_path):
    """Entry B repeats 3 of entry A's questions. When A changes (drops them) B's rows come back;
    when B changes (no duplicates left) no stale duplicate shard is counted; records == questions +
    quarantined every time; the ingest stage resumes (done entries are not re-read)."""
    from octomed_data.ingest import plan_entries, summarize_ingest
    from octomed_data.layout import RunPaths
    from octomed_data.stages import run_stage
    from octomed_data.stages.ingest import IngestStage

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(_medqa_lines(shared_data, 8)))
    b.write_text("".join(_medqa_lines(shared_data, 3)))  # duplicates of A's first three
    entries = [
        {"name": "A", "format": "medqa", "input": str(a)},
        {"name": "B", "format": "medqa", "input": str(b)},
    ]
    paths = RunPaths(str(tmp_path / "store"), "r")

    def ingest_pass() -> dict:
        stage = IngestStage.for_run(paths, entries, 5000)
        result = run_stage(stage)
        assert not result.failed and not result.pending
        final = summarize_ingest(paths.stage("ingest"), plan_entries(entries))
        assert final.records == final.questions + final.quarantined
        questions = storage.Dataset(paths.ingested).num_rows()
        quarantined = storage.Dataset(paths.quarantine).num_rows()
        assert (final.questions, final.quarantined) == (questions, quarantined)
        return {"states": {s: o.state for s, o in result.outcomes.items()}, "per_source": final.per_source}

    first = ingest_pass()
    assert first["per_source"]["B"] == {"records": 3, "questions": 0, "quarantined": 3}
    assert ingest_pass()["states"] == {"A": "REUSED", "B": "REUSED"}
    # A drops the three questions B repeats: B's rows are no longer duplicates and come back.
    a.write_text("".join(_medqa_lines(shared_data, 5, skip=3)))
    changed = ingest_pass()
    assert changed["states"] == {"A": "COMPLETED", "B": "COMPLETED"}
    assert changed["per_source"]["B"] == {"records": 3, "questions": 3, "quarantined": 0}
    assert storage.Dataset(paths.ingested).num_rows() == 8
    # B repeats A again, then B changes to two new questions: no stale duplicate shard stays.
    a.write_text("".join(_medqa_lines(shared_data, 8)))
    ingest_pass()
    b.write_text("".join(_medqa_lines(shared_data, 2, skip=20)))
    last = ingest_pass()
    assert last["per_source"]["B"] == {"records": 2, "questions": 2, "quarantined": 0}
    assert not [s for s in storage.Dataset(paths.quarantine).manifest() if s.endswith("-dup")]


def test_entries_with_colliding_names_each_keep_their_input(shared_data, tmp_path):
    from octomed_data.ingest import plan_entries

    f = tmp_path / "m.jsonl"
    f.write_text("".join(_medqa_lines(shared_data, 2)))
    plans = plan_entries([{"name": n, "format": "medqa", "input": str(f)} for n in ("m", "m", "m-2")])
    assert len({p.name for p in plans}) == 3


def test_control_characters_stripped_at_ingest_are_counted_in_the_summary(shared_data, tmp_path, capsys):
    """Real MedQA records, one with a NUL and a right-to-left override injected: the summary, ingest.json
    and the CLI line say how many characters were stripped, and the stored question has none."""
    lines = (shared_data / "medqa/phrases_no_exclude_test.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    rec = json.loads(lines[2])
    rec["question"] = "\x00" + rec["question"][:20] + "\u202e" + rec["question"][20:]
    lines[2] = json.dumps(rec)
    src = tmp_path / "medqa.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = ingest("medqa", str(src), str(out))
    assert result.cleaned == {"control_chars_removed": 2, "records_with_control_chars": 1}
    assert json.loads((out / "ingest.json").read_text())["cleaned"] == result.cleaned
    texts = (
        storage.Dataset(str(out / "questions"), QUESTION_SCHEMA).read_all(["question"]).column(0).to_pylist()
    )
    assert len(texts) == 5 and not any("\x00" in t or "\u202e" in t for t in texts)
    assert main(["ingest", "medqa", str(src), "--out", str(tmp_path / "cli")]) == 0
    assert "cleaned: control_chars_removed=2, records_with_control_chars=1" in capsys.readouterr().out
