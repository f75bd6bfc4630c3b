"""Gold-label audit: planted wrong labels in runs of real questions, through the real filter stage.

Questions are real (MedQA test questions, PathVQA textbook pairs from ``../shared/data``); the
teacher replies are sandbox-like (the forms real teachers state answers in) and go through the
filter stage as a run does (extraction, verifier, verdicts, the statistics pass in finalize).
The last tests run the audit on real model replies: Liévin et al.'s public InstructGPT
chain-of-thought samples for 99 MedQA-USMLE validation questions (``tests/audit_data``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from octomed_data import storage
from octomed_data.audit import (
    AUDIT_SCHEMA,
    NEVER_CORRECT,
    SUSPECTED_LABEL_ERROR,
    AuditSettings,
    ShardAudit,
    audit_verdicts_shard,
    flagged_questions,
)
from octomed_data.errors import StorageError
from octomed_data.layout import FilterFolder, RunPaths
from octomed_data.mixture import MixtureConfig, build_mixture
from octomed_data.report import audit_rows, report_markdown, sample_stats
from octomed_data.sandbox import SANDBOX_MARK
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, question_row
from octomed_data.stages.filter import FilterStage
from octomed_data.stages.local import run_stage
from octomed_data.stats import source_statistics
from octomed_data.verify import VerifySettings
from tests.support.orchestration import real_mcqs

N = 8  # samples per question
LABELS = "ABCD"
FORMATS = (  # how real teachers state a label (the sandbox rotates through the same kinds)
    "Final answer: \\boxed{{{label}}}",
    "The answer is ({label}).",
    "Answer: {label}",
    "<answer>{label}</answer>",
    "**Answer: {label}** - the other options fit the findings less well.",
    "Therefore, among A through D, the answer is {label}.",
)
LIEVIN = Path(__file__).parent / "audit_data" / "lievin_usmle_valid.jsonl.gz"


def _other(label: str, k: int = 1) -> str:
    return LABELS[(LABELS.index(label) + k) % len(LABELS)]


def _sample(q: dict[str, Any], idx: int, answer: str | None, *, failed: bool = False, **extra: Any) -> dict:
    reasoning = f"{SANDBOX_MARK} The key findings point toward one mechanism (sample {idx})."
    if answer is None:
        response = "Several options remain plausible; more information would be needed."
    elif q["task_type"] == "text_mcq":
        response = FORMATS[idx % len(FORMATS)].format(label=answer)
    else:
        response = f"Final answer: \\boxed{{{answer}}}"
    row = {
        "question_id": q["question_id"],
        "source": q["source"],
        "task_type": q["task_type"],
        "sample_idx": idx,
        "seed": idx,
        "teacher": "sandbox",
        "model": "sandbox",
        "prompt_version": "v1",
        "params_hash": "p",
        "reasoning": reasoning,
        "response": response,
        "gold_answer": q["answer"],
        "finish_reason": "stop",
    }
    if failed:
        row.update(
            reasoning=None,
            response=None,
            reject_reason="request_failed",
            error="HTTP 503",
            finish_reason=None,
        )
    return row | extra


# Per MedQA question (by index): what the teacher says, as (answer kind, count) over N samples.
# "true" is the question's real answer, "gold" the label the run carries (planted: another one).
PLANTED = {2, 7, 15}  # gold label replaced by a wrong one; the teacher keeps saying the real answer
NEVER = {4, 19}  # the teacher splits between two wrong answers: no majority, never right
HARD = {11}  # 5 on one wrong answer, 3 right: a hard question, not a label error
ALL_FAILED, NONE_ANSWERED = 21, 22


def _mcq_plan(i: int) -> list[str]:
    """The answer kind of each of the N samples of question ``i``."""
    if i in PLANTED:
        return ["true"] * 7 + ["gold"]  # 1 of 8 agrees with the planted label: it gets accepted
    if i in NEVER:
        return ["wrong1"] * 4 + ["wrong2"] * 4
    if i in HARD:
        return ["wrong1"] * 5 + ["gold"] * 3
    if i == ALL_FAILED:
        return ["failed"] * N
    if i == NONE_ANSWERED:
        return ["none"] * 4 + ["truncated"] * 4
    return ["gold"] * 6 + ["wrong1", "truncated"]  # a clean question, with the usual noise


def build_mcq_run(shared_data: Path, root: Path | str) -> tuple[RunPaths, dict[int, str]]:
    """24 real MedQA questions in two shards, 8 replies each; returns the run and index -> question id."""
    paths = RunPaths.at(str(root))
    ids: dict[int, str] = {}
    for shard_no, chunk in enumerate((range(0, 12), range(12, 24))):
        shard = f"medqa-{shard_no:05d}"
        records = real_mcqs(shared_data, 24)
        questions, samples = [], []
        for i in chunk:
            rec = records[i]
            true = rec["answer_idx"]
            gold = _other(true) if i in PLANTED else true
            q = question_row(
                source="medqa",
                split="train",
                task_type="text_mcq",
                question=rec["question"],
                options=rec["options"],
                answer=gold,
                input_file="medqa.jsonl",
                record_index=i,
            )
            ids[i] = q["question_id"]
            questions.append(q)
            for idx, kind in enumerate(_mcq_plan(i)):
                answer = {
                    "true": true,
                    "gold": gold,
                    "wrong1": _other(gold, 2),
                    "wrong2": _other(gold, 3),
                }.get(kind)
                if kind == "failed":
                    samples.append(_sample(q, idx, None, failed=True))
                elif kind == "truncated":
                    samples.append(_sample(q, idx, None, response="", finish_reason="length"))
                else:
                    samples.append(_sample(q, idx, answer))
        storage.Dataset(paths.questions, QUESTION_SCHEMA).write_shard(shard, questions)
        storage.Dataset(paths.raw, SAMPLE_SCHEMA).write_shard(shard, samples)
    return paths, ids


def _audit_rows(paths: RunPaths) -> dict[str, dict]:
    ds = storage.Dataset(FilterFolder(paths.stage("filter")).audit, AUDIT_SCHEMA)
    return {r["question_id"]: r for r in ds.read_all().to_pylist()}


@pytest.fixture
def mcq_run(shared_data, tmp_path):
    paths, ids = build_mcq_run(shared_data, tmp_path / "run")
    result = run_stage(FilterStage(paths, samples_per_question=N))
    return paths, ids, result.final["stats"]


def test_planted_labels_flagged_exactly(mcq_run):
    paths, ids, stats = mcq_run
    rows = _audit_rows(paths)
    assert len(rows) == 24  # one row per question, both shards
    flagged = {qid: r["flag"] for qid, r in rows.items() if r["flag"]}
    assert flagged == {ids[i]: SUSPECTED_LABEL_ERROR for i in PLANTED} | {
        ids[i]: NEVER_CORRECT for i in NEVER
    }
    for i in PLANTED:
        r = rows[ids[i]]
        assert r["majority_answer"] != r["gold_answer"] and r["majority_share"] == 0.875
        assert (r["n_samples"], r["n_answered"], r["n_correct"]) == (8, 8, 1)
    hard = rows[ids[next(iter(HARD))]]
    assert hard["flag"] is None and hard["majority_share"] == 0.625 and hard["n_correct"] == 3
    failed, unanswered = rows[ids[ALL_FAILED]], rows[ids[NONE_ANSWERED]]
    assert (failed["n_failed"], failed["n_samples"], failed["flag"], failed["majority_answer"]) == (
        8,
        0,
        None,
        None,
    )
    assert (unanswered["n_samples"], unanswered["n_answered"], unanswered["flag"]) == (8, 0, None)

    audit = stats["audit"]["sources"]["medqa"]
    assert (audit["suspected_label_error"], audit["never_correct"]) == (3, 2)
    assert (audit["questions"], audit["questions_answered"]) == (24, 22)
    assert (audit["all_requests_failed"], audit["none_answered"]) == (1, 1)
    examples = audit["examples"][SUSPECTED_LABEL_ERROR]
    assert sorted(e["question_id"] for e in examples) == sorted(ids[i] for i in PLANTED)
    # stats.json is what finalize wrote, and the audit agrees with the rest of the statistics
    on_disk = storage.read_json(paths.stats)
    assert on_disk["audit"] == stats["audit"]
    # the statistics count a question once a sample came back: all-failed ones are not in them
    medqa = stats["sources"]["medqa"]
    assert medqa["questions"] == audit["questions"] - audit["all_requests_failed"] == 23
    assert medqa["questions_without_accepted"] == audit["never_correct"] + audit["none_answered"]


def test_report_shows_the_audit(mcq_run):
    paths, ids, stats = mcq_run
    view = sample_stats(stats)
    row = {r["source"]: r for r in audit_rows(view)}["medqa"]
    assert (row["suspected_label_error"], row["never_correct"], row["all_requests_failed"]) == (3, 2, 1)
    md = report_markdown(run_id="audit", stats=view)
    assert "## Gold-label audit" in md and "| medqa | 24 | 22 | 3 | 2 | 1 | 1 |" in md
    i = min(PLANTED, key=lambda k: ids[k])
    rows = _audit_rows(paths)
    gold, majority = rows[ids[i]]["gold_answer"], rows[ids[i]]["majority_answer"]
    assert f"`{ids[i]}` (medqa, suspected_label_error): gold `{gold}`, majority `{majority}` (88% of 8" in md


def test_rerun_counts_nothing_twice_and_stale_audit_is_refused(mcq_run):
    paths, ids, stats = mcq_run
    audit = storage.Dataset(FilterFolder(paths.stage("filter")).audit)
    before = {s: i.committed_at for s, i in audit.manifest().items()}
    again = run_stage(FilterStage(paths, samples_per_question=N))  # a finished run, finalized again
    assert all(o.state == "REUSED" for o in again.outcomes.values())
    assert again.final["stats"]["audit"] == stats["audit"]
    assert again.final["stats"]["sources"] == stats["sources"]
    assert {s: i.committed_at for s, i in audit.manifest().items()} == before  # nothing rewritten
    assert len(_audit_rows(paths)) == 24

    # one shard re-filtered without the statistics pass: its audit no longer matches its verdicts
    run_stage(FilterStage(paths, samples_per_question=N), shards=["medqa-00000"], finalize=False)
    config = MixtureConfig(exclude_audit_flags=[SUSPECTED_LABEL_ERROR], validation_fraction=0)
    with pytest.raises(StorageError, match="older than its verdicts: run the filter stage again"):
        build_mixture(paths.accepted, paths.questions, str(paths.mixture), config)
    run_stage(FilterStage(paths, samples_per_question=N))  # the full pass finalizes: audit rewritten
    assert flagged_questions(audit.uri, "medqa-00000", [SUSPECTED_LABEL_ERROR]) == {
        ids[i]: SUSPECTED_LABEL_ERROR for i in PLANTED if i < 12
    }

    # a verdicts shard that vanished takes its audit shard with it
    storage.Dataset(paths.verdicts).delete_shard("medqa-00001")
    partial = source_statistics(paths.verdicts)
    assert list(audit.manifest()) == ["medqa-00000"]
    assert partial["audit"]["sources"]["medqa"]["questions"] == 12


def test_mixture_excludes_flagged_questions(mcq_run, tmp_path):
    paths, ids, _ = mcq_run
    planted = {ids[i] for i in PLANTED}
    plain = build_mixture(
        paths.accepted, paths.questions, str(tmp_path / "plain"), MixtureConfig(validation_fraction=0)
    )
    plain_q = {r["question_id"] for r in storage.Dataset(plain.train_uri).iter_rows()}
    assert planted <= plain_q  # today's behaviour: the trace agreeing with the wrong label is kept
    config = MixtureConfig(exclude_audit_flags=[SUSPECTED_LABEL_ERROR], validation_fraction=0)
    result = build_mixture(paths.accepted, paths.questions, str(tmp_path / "audited"), config)
    rows = list(storage.Dataset(result.train_uri).iter_rows())
    assert not planted & {r["question_id"] for r in rows}
    counts = result.sources["medqa"]
    assert (counts.excluded_by_audit, counts.questions_excluded_by_audit) == (3, 3)
    assert counts.accepted == plain.sources["medqa"].accepted  # read, then left out
    assert result.rows_train == plain.rows_train - 3
    summary = storage.read_json(storage.join(str(tmp_path / "audited"), "mixture.json"))
    assert summary["config"]["exclude_audit_flags"] == [SUSPECTED_LABEL_ERROR]
    assert summary["sources"]["medqa"]["excluded_by_audit"] == 3
    assert summary["inputs"]["audit"] == [FilterFolder(paths.stage("filter")).audit]
    # never-correct questions have no accepted trace: excluding them changes nothing
    never = build_mixture(
        paths.accepted,
        paths.questions,
        str(tmp_path / "never"),
        MixtureConfig(exclude_audit_flags=[NEVER_CORRECT]),
    )
    assert never.sources["medqa"].excluded_by_audit == 0
    with pytest.raises(ValueError):
        MixtureConfig(exclude_audit_flags=["wrong_flag"])


def test_audit_and_exclusion_on_s3(shared_data, s3_bucket):
    """The audit is written and read through the storage layer: the same on an object store."""
    paths, ids = build_mcq_run(shared_data, f"{s3_bucket}/run")
    stats = run_stage(FilterStage(paths, samples_per_question=N)).final["stats"]
    assert stats["audit"]["dataset"] == f"{s3_bucket}/run/filter/audit"
    assert (
        stats["audit"]["overall"]["suspected_label_error"],
        stats["audit"]["overall"]["never_correct"],
    ) == (3, 2)
    config = MixtureConfig(exclude_audit_flags=[SUSPECTED_LABEL_ERROR], validation_fraction=0)
    result = build_mixture(paths.accepted, paths.questions, f"{s3_bucket}/mix", config)
    assert result.sources["medqa"].questions_excluded_by_audit == 3
    assert not {ids[i] for i in PLANTED} & {
        r["question_id"] for r in storage.Dataset(result.train_uri).iter_rows()
    }


def test_mixture_without_an_audit_is_one_line_error(mcq_run, tmp_path):
    paths, _, _ = mcq_run
    config = MixtureConfig(exclude_audit_flags=[SUSPECTED_LABEL_ERROR])
    with pytest.raises(StorageError, match="no gold-label audit for shard medqa-00000"):
        build_mixture(
            paths.accepted, paths.questions, str(tmp_path / "m"), config, audit=str(tmp_path / "none")
        )


def test_settings_are_configurable(mcq_run):
    paths, ids, _ = mcq_run
    strict = AuditSettings(max_correct_share=0.0)  # no accepted sample at all
    rows = {
        r["question_id"]: r
        for s in ("medqa-00000", "medqa-00001")
        for r in audit_verdicts_shard(paths.verdicts, s, strict)
    }
    assert not any(r["flag"] == SUSPECTED_LABEL_ERROR for r in rows.values())
    assert all(rows[ids[i]]["flag"] is None for i in PLANTED)  # 1 correct: not "never correct" either
    loose = AuditSettings(agree_share=0.6, max_correct_share=0.4)
    rows = {r["question_id"]: r for r in audit_verdicts_shard(paths.verdicts, "medqa-00000", loose)}
    assert rows[ids[next(iter(HARD))]]["flag"] == SUSPECTED_LABEL_ERROR  # 5 of 8 on another answer
    few = AuditSettings(min_samples=9)
    rows = {r["question_id"]: r for r in audit_verdicts_shard(paths.verdicts, "medqa-00000", few)}
    assert {r["flag"] for r in rows.values()} == {None, NEVER_CORRECT}
    with pytest.raises(ValueError):
        AuditSettings(agree_share=0.5)  # a majority must be unique
    assert AuditSettings().fingerprint() != loose.fingerprint()


# ------------------------------------------------------------------------------ open-ended


def _pathvqa_pairs(shared_data: Path, n: int) -> list[dict]:
    pairs = json.loads((shared_data / "pathvqa" / "QA_pairs_vb.json").read_text(encoding="utf-8"))
    return [p for p in pairs if p["Answers"].lower() not in ("yes", "no")][:n]


def test_open_answers_compare_as_the_verifier_does(shared_data, tmp_path):
    """Open answers: the normalized verifier's equivalences are not label errors; plurals group."""
    pairs = _pathvqa_pairs(shared_data, 5)
    # (source, gold the run carries, the N replies)
    plan = [
        ("pathvqa", pairs[0]["Answers"], [pairs[0]["Answers"]] * 6 + ["nucleus", "cytoplasm"]),
        ("pathvqa", "liver", [pairs[1]["Answers"]] * 7 + ["liver"]),  # planted
        ("pathvqa", "5 mm", ["0.5 cm"] * 8),  # the same length: the verifier accepts it
        ("pathvqa", "spleen", ["kidneys"] * 4 + ["kidney"] * 3 + ["spleen"]),  # planted; plurals group
        ("pathvqa_exact", "computed tomography", ["CT scan"] * 8),  # exact mode: never accepted
    ]
    paths = RunPaths.at(str(tmp_path / "run"))
    questions, samples = [], []
    for i, ((source, gold, replies), pair) in enumerate(zip(plan, pairs, strict=True)):
        q = question_row(
            source=source,
            split="train",
            task_type="open_qa",
            question=pair["Questions"],
            options=None,
            answer=gold,
            input_file="QA_pairs_vb.json",
            record_index=i,
        )
        questions.append(q)
        samples += [_sample(q, idx, a) for idx, a in enumerate(replies)]
    storage.Dataset(paths.questions, QUESTION_SCHEMA).write_shard("pathvqa-00000", questions)
    storage.Dataset(paths.raw, SAMPLE_SCHEMA).write_shard("pathvqa-00000", samples)
    verify = VerifySettings(sources={"pathvqa": "normalized"})
    stats = run_stage(FilterStage(paths, verify=verify)).final["stats"]
    rows = _audit_rows(paths)
    by_gold = {r["gold_answer"]: r for r in rows.values()}
    assert by_gold[pairs[0]["Answers"]]["flag"] is None
    assert by_gold["liver"]["flag"] == SUSPECTED_LABEL_ERROR and by_gold["liver"]["n_correct"] == 1
    assert by_gold["5 mm"]["flag"] is None and by_gold["5 mm"]["n_correct"] == 8
    spleen = by_gold["spleen"]
    assert (spleen["flag"], spleen["majority_answer"], spleen["majority_share"]) == (
        SUSPECTED_LABEL_ERROR,
        "kidneys",
        0.875,
    )
    ct = by_gold["computed tomography"]  # the verifier never accepted it, but it is not another answer
    assert (ct["flag"], ct["n_correct"], ct["majority_answer"]) == (NEVER_CORRECT, 0, "ct scan")
    assert stats["audit"]["sources"]["pathvqa"]["suspected_label_error"] == 2
    assert stats["audit"]["sources"]["pathvqa_exact"]["never_correct"] == 1


def test_judge_unparsed_and_unverified_replies_are_not_answers():
    audit = ShardAudit()
    base = {"question_id": "q", "source": "s", "task_type": "text_mcq", "gold_answer": "A"}
    for reason in ("judge_unparsed", "ambiguous", "truncated"):
        audit.add(base | {"extracted_answer": "B", "correct": False, "reject_reason": reason})
    audit.add(base | {"extracted_answer": "B", "correct": False, "reject_reason": "wrong_answer"})
    row = audit.rows()[0]
    assert (row["n_samples"], row["n_answered"], row["flag"], row["majority_answer"]) == (
        4,
        1,
        NEVER_CORRECT,
        "B",
    )


# ---------------------------------------------------------------- real third-party replies


def _lievin() -> list[dict]:
    with gzip.open(LIEVIN, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _lievin_run(root: Path, planted: set[int]) -> tuple[RunPaths, list[dict], list[str]]:
    """Liévin et al.'s 99 questions x 30 InstructGPT replies as a run (gold replaced where planted)."""
    paths = RunPaths.at(str(root))
    records = _lievin()
    questions, samples, ids = [], [], []
    for i, rec in enumerate(records):
        gold = _other(rec["answer_idx"]) if i in planted else rec["answer_idx"]
        q = question_row(
            source="medqa_usmle_valid",
            split="validation",
            task_type="text_mcq",
            question=rec["question"],
            options=rec["options"],
            answer=gold,
            input_file="usmle-valid.html",
            record_index=i,
        )
        questions.append(q)
        ids.append(q["question_id"])
        for idx, reply in enumerate(rec["replies"]):
            samples.append(
                _sample(q, idx, None, response=reply["tail"], reasoning=None, teacher="code-davinci-002")
            )
    storage.Dataset(paths.questions, QUESTION_SCHEMA).write_shard("usmle-00000", questions)
    storage.Dataset(paths.raw, SAMPLE_SCHEMA).write_shard("usmle-00000", samples)
    return paths, records, ids


def test_real_replies_audit_agrees_with_the_authors_marks(tmp_path):
    """On real model replies with their published labels: our per-question correct counts match the
    authors' own marks, and the questions flagged never-correct are the ones they marked 0/30."""
    paths, records, ids = _lievin_run(tmp_path / "run", set())
    stats = run_stage(FilterStage(paths, samples_per_question=30)).final["stats"]
    rows = _audit_rows(paths)
    # per reply: our verdict (the one extractor + exact match) against the authors' mark
    marks = {
        (qid, i): r["correct"]
        for qid, rec in zip(ids, records, strict=True)
        for i, r in enumerate(rec["replies"])
    }
    verdicts = storage.Dataset(paths.verdicts).read_all(["question_id", "sample_idx", "correct"]).to_pylist()
    assert len(verdicts) == len(marks) == 2970
    differ = [v for v in verdicts if v["correct"] != marks[(v["question_id"], v["sample_idx"])]]
    # 11 of 2,970 replies differ (measured): "A and D", "none of the above", "unknown", which the
    # authors' parser counted right and ours refuses as ambiguous or unanswered
    assert len(differ) <= 0.01 * len(marks)
    theirs = [sum(r["correct"] for r in rec["replies"]) for rec in records]
    ours = [rows[qid]["n_correct"] for qid in ids]
    assert all(abs(t - o) <= 3 for o, t in zip(ours, theirs, strict=True))
    # every question the authors marked 0/30 is flagged (never correct, or a confident other answer)
    for qid, n in zip(ids, theirs, strict=True):
        if n == 0:
            assert rows[qid]["n_correct"] == 0 and rows[qid]["flag"] in (NEVER_CORRECT, SUSPECTED_LABEL_ERROR)
    assert all(r["n_correct"] == 0 for r in rows.values() if r["flag"] == NEVER_CORRECT)
    audit = stats["audit"]["sources"]["medqa_usmle_valid"]
    assert audit["questions"] == 99 and audit["questions_answered"] == 99
    # InstructGPT is confidently wrong on some questions (30 prompts, one model): those are flagged
    assert audit["suspected_label_error"] >= 1
    # each flag is what its definition says, on real answers
    for qid in ids:
        r = rows[qid]
        if r["flag"] == SUSPECTED_LABEL_ERROR:
            assert r["majority_share"] >= 0.75 and r["majority_answer"] != r["gold_answer"]
            assert r["n_answered"] >= 4 and r["n_correct"] <= 0.25 * r["n_answered"]


def test_real_replies_with_planted_wrong_labels(tmp_path):
    """Plant wrong gold labels where the model's 30 replies mostly agree with the real gold:
    the audit flags exactly those, and nothing among the questions whose label was kept changes."""
    clean_paths, records, ids = _lievin_run(tmp_path / "clean", set())
    run_stage(FilterStage(clean_paths, samples_per_question=30))
    clean = _audit_rows(clean_paths)
    confident = [i for i, qid in enumerate(ids) if clean[qid]["n_correct"] >= 0.8 * clean[qid]["n_answered"]]
    assert len(confident) >= 10
    planted = set(confident[::2])
    paths, _, planted_ids = _lievin_run(tmp_path / "planted", planted)
    run_stage(FilterStage(paths, samples_per_question=30))
    rows = _audit_rows(paths)
    assert {planted_ids[i] for i in planted} <= {
        q for q, r in rows.items() if r["flag"] == SUSPECTED_LABEL_ERROR
    }
    for i, qid in enumerate(planted_ids):
        if i not in planted:  # same question, same gold: same audit row
            assert (
                rows[qid]["flag"] == clean[ids[i]]["flag"]
                and rows[qid]["n_correct"] == clean[ids[i]]["n_correct"]
            )


def test_tally_examples_are_the_smallest_ids_whatever_the_order():
    from octomed_data.audit import AuditTally

    def row(qid: str) -> dict:
        return {
            "question_id": qid,
            "source": "s",
            "gold_answer": "A",
            "majority_answer": "B",
            "majority_share": 0.9,
        }

    tally = AuditTally(AuditSettings(examples=2))
    common = {"n_samples": 10, "n_failed": 0, "n_answered": 10, "n_correct": 0, "flag": SUSPECTED_LABEL_ERROR}
    tally.add([row(q) | common for q in ("q5", "q1", "q3", "q1")])  # q1 twice: a duplicate id never breaks it
    summary = tally.summary()["sources"]["s"]
    assert summary["suspected_label_error"] == 4
    assert [e["question_id"] for e in summary["examples"][SUSPECTED_LABEL_ERROR]] == ["q1", "q1"]
