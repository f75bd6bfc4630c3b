"""The LLM difficulty-score band filter against the sandbox grader on loopback."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cli import main
from octomed_data import storage
from octomed_data.distill.filtering import (
    GRADING_SYSTEM_PROMPT,
    SCORE_SCHEMA,
    Grade,
    grading_messages,
    parse_difficulty,
    scores_uri,
)
from octomed_data.errors import ConfigError
from octomed_data.prompts import build_messages, render_question
from octomed_data.sandbox import FaultConfig, difficulty_score, start_sandbox
from octomed_data.schema import QUESTION_SCHEMA
from octomed_data.stages.difficulty import filter_by_difficulty
from octomed_data.teachers import TeacherConfig
from tests.support.distill import make_questions

KEY = "sk-grader-DO-NOT-LEAK-9b8e7d6c5a"
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.2}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def grader(base_url: str, **over) -> TeacherConfig:
    return TeacherConfig(
        name="grader", base_url=base_url, model="sandbox-grader", temperature=0.0, max_in_flight=8, **over
    )


def two_shards(root: Path) -> tuple[str, list[dict]]:
    """24 questions from two sources in two shards."""
    uri = str(root / "q")
    rows = make_questions(uri, 14, shard="00000", source="medqa")
    rows += make_questions(uri, 10, shard="00001", source="pubmedqa", offset=100)
    return uri, rows


def expected_score(q: dict) -> int:
    return difficulty_score(render_question(q), 1, 10)


def read(uri: str, schema) -> list[dict]:
    return storage.Dataset(uri, schema).read_all().to_pylist()


@pytest.mark.parametrize(
    ("text", "grade"),
    [
        ("Reason: needs two steps.\nDifficulty: 7", Grade(7)),
        ("**Difficulty:** 3/10", Grade(3)),
        ("Difficulty = 10.", Grade(10)),
        ("Difficulty: 4\n...on reflection still:\nDifficulty: 4", Grade(4)),
        ("Reason: fine.\nDifficulty: moderate", Grade(None, "not_an_integer")),
        ("Difficulty: 7.5", Grade(None, "not_an_integer")),
        ("Difficulty: 6\nDifficulty: 8", Grade(None, "ambiguous")),
        ("Difficulty: 11", Grade(None, "out_of_range")),
        ("Difficulty: 0", Grade(None, "out_of_range")),
        ("I would rate it a 7 out of 10.", Grade(None, "no_score")),
        ("The difficulty: depends, maybe 7", Grade(None, "no_score")),
        ("", Grade(None, "no_score")),
    ],
)
def test_parse_difficulty_is_strict(text: str, grade: Grade) -> None:
    assert parse_difficulty(text) == grade


def test_grading_prompt_keeps_the_question_turn(tmp_path: Path) -> None:
    q = make_questions(str(tmp_path / "q"), 1)[0]
    msgs = grading_messages(q)
    assert msgs[0] == {"role": "system", "content": GRADING_SYSTEM_PROMPT}
    assert msgs[1] == build_messages(q)[1]


def test_exact_kept_set_for_a_band_and_rebanding_asks_nothing(tmp_path: Path) -> None:
    q_uri, questions = two_shards(tmp_path)
    out, filtered = str(tmp_path / "grading"), str(tmp_path / "filtered")
    scores = {q["question_id"]: expected_score(q) for q in questions}
    assert len(set(scores.values())) >= 5  # the band below really splits the set
    with start_sandbox(style="mixed") as sb:
        result = filter_by_difficulty(
            q_uri, out, filtered, teacher=grader(sb.base_url), low=4, high=7, **FAST
        )
        first = sb.stats()["requests"]
        kept_ids = {qid for qid, s in scores.items() if 4 <= s <= 7}
        assert first == len(questions) == result["new_scores"]
        assert result["kept"] == len(kept_ids) and result["dropped"] == len(questions) - len(kept_ids)
        assert result["unscored"] == result["failed"] == 0 and result["complete"]
        by_source = Counter(q["source"] for q in questions if q["question_id"] in kept_ids)
        assert {s: c["kept"] for s, c in result["per_source"].items()} == {
            "medqa": by_source["medqa"],
            "pubmedqa": by_source["pubmedqa"],
        }
        kept_ds = storage.Dataset(filtered, QUESTION_SCHEMA)
        assert sorted(kept_ds.manifest()) == ["00000", "00001"]
        kept = kept_ds.read_all().to_pylist()
        # Same rows, same order, nothing else.
        assert kept == [q for q in questions if q["question_id"] in kept_ids]
        score_rows = read(scores_uri(out), SCORE_SCHEMA)
        assert {r["question_id"]: r["score"] for r in score_rows} == scores
        assert all(r["status"] == "scored" and r["grader"] == "sandbox" for r in score_rows)
        assert all(r["response"].endswith(f"Difficulty: {r['score']}") for r in score_rows)
        assert {r["question_id"] for r in score_rows if r["kept"]} == kept_ids

        # Another band: every score is stored, so not one request.
        again = filter_by_difficulty(
            q_uri, out, filtered, teacher=grader(sb.base_url), low=8, high=10, **FAST
        )
        assert sb.stats()["requests"] == first
        assert again["new_scores"] == 0 and again["stored_before"] == len(questions)
        high_ids = {qid for qid, s in scores.items() if s >= 8}
        assert {r["question_id"] for r in read(filtered, QUESTION_SCHEMA)} == high_ids

        # A different grader model is a different key: it is asked again.
        other = grader(sb.base_url).model_copy(update={"model": "sandbox-grader-2"})
        filter_by_difficulty(q_uri, out, filtered, teacher=other, low=1, high=10, shards=["00001"], **FAST)
        assert sb.stats()["requests"] == first + 10


def test_resume_asks_only_for_questions_without_a_stored_answer(tmp_path: Path) -> None:
    q_uri, questions = two_shards(tmp_path)
    out, filtered = str(tmp_path / "grading"), str(tmp_path / "filtered")
    faults = FaultConfig(seed=3, server_error=0.2, rate_limited=0.1, dropped=0.1, retry_after_s=0.01)
    with start_sandbox(faults=faults) as sb:
        # One attempt per question: every faulted request is a question left without a score.
        r1 = filter_by_difficulty(
            q_uri, out, filtered, teacher=grader(sb.base_url), low=1, high=5, max_attempts=1, **FAST
        )
        log1 = sb.stats()["log"]
        faulted = {e["key"] for e in log1 if e["fault"]}
        assert len(log1) == len(questions) and 0 < len(faulted) < len(questions)
        assert r1["failed"] == len(faulted) and not r1["complete"]
        assert r1["new_scores"] == len(questions) - len(faulted)
        # A shard with failures is withheld from the filtered dataset, not written short.
        failed_rows = [r for r in read(scores_uri(out), SCORE_SCHEMA) if r["status"] == "request_failed"]
        assert len(failed_rows) == len(faulted) and all(r["error"] for r in failed_rows)
        written = set(storage.Dataset(filtered, QUESTION_SCHEMA).manifest())
        assert written == {s for s in ("00000", "00001") if s not in r1["incomplete_shards"]}

        r2 = filter_by_difficulty(q_uri, out, filtered, teacher=grader(sb.base_url), low=1, high=5, **FAST)
        log2 = sb.stats()["log"][len(log1) :]
        # Only questions whose earlier request failed were asked again (retries may repeat a key).
        assert {e["key"] for e in log2} == faulted
        assert r2["stored_before"] == len(questions) - len(faulted) and r2["new_scores"] == len(faulted)
        assert r2["complete"] and r2["failed"] == 0
    scores = {q["question_id"]: expected_score(q) for q in questions}
    rows = read(scores_uri(out), SCORE_SCHEMA)
    assert len(rows) == len(questions) and {r["question_id"]: r["score"] for r in rows} == scores
    kept = [r["question_id"] for r in read(filtered, QUESTION_SCHEMA)]
    assert kept == [q["question_id"] for q in questions if scores[q["question_id"]] <= 5]


def test_unparseable_and_truncated_replies_are_unscored_never_guessed(tmp_path: Path) -> None:
    q_uri, questions = two_shards(tmp_path)
    out, filtered = str(tmp_path / "grading"), str(tmp_path / "filtered")
    faults = FaultConfig(seed=11, unparseable=0.3, truncated=0.1)
    with start_sandbox(faults=faults, style="think") as sb:
        result = filter_by_difficulty(
            q_uri, out, filtered, teacher=grader(sb.base_url), low=1, high=10, **FAST
        )
        requests = sb.stats()["requests"]
        rows = read(scores_uri(out), SCORE_SCHEMA)
        unscored = [r for r in rows if r["status"] == "unscored"]
        reasons = Counter(r["reason"] for r in unscored)
        assert (
            reasons["not_an_integer"] > 0
            and reasons["truncated"] > 0
            and set(reasons)
            == {
                "not_an_integer",
                "truncated",
            }
        )
        assert all(r["score"] is None and r["kept"] is False for r in unscored)
        assert result["unscored"] == len(unscored) and result["kept"] == len(questions) - len(unscored)
        assert result["complete"] and result["failed"] == 0
        # The full band keeps every scored question and no unscored one.
        kept = {r["question_id"] for r in read(filtered, QUESTION_SCHEMA)}
        assert kept == {r["question_id"] for r in rows if r["status"] == "scored"}
        # An unscored answer is stored: a re-run does not ask again.
        filter_by_difficulty(q_uri, out, filtered, teacher=grader(sb.base_url), low=1, high=10, **FAST)
        assert sb.stats()["requests"] == requests


def test_band_and_key_errors_are_clear(tmp_path: Path, monkeypatch) -> None:
    q_uri, _ = two_shards(tmp_path)
    t = grader("http://127.0.0.1:9/v1")
    for low, high in ((5, 2), (0, 4), (3, 11)):
        with pytest.raises(ConfigError, match="difficulty band"):
            filter_by_difficulty(
                q_uri, str(tmp_path / "o"), str(tmp_path / "f"), teacher=t, low=low, high=high
            )
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        filter_by_difficulty(q_uri, str(tmp_path / "o"), str(tmp_path / "f"), teacher=t, low=1, high=5)


def _grep_tree(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_cli_runs_and_the_key_never_appears(tmp_path: Path, capsys, caplog) -> None:
    q_uri, questions = two_shards(tmp_path)
    out = tmp_path / "grading"
    faults = FaultConfig(seed=5, server_error=0.2, unparseable=0.2)
    with start_sandbox(faults=faults) as sb:
        argv = ["filter-difficulty", q_uri, "--base-url", sb.base_url, "--model", "sandbox-grader"]
        rc = main([*argv, "--low", "3", "--high", "8", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "questions:" in captured.err and "kept" in captured.err
    kept = read(str(out / "questions"), QUESTION_SCHEMA)
    scored = {r["question_id"]: r for r in read(scores_uri(str(out)), SCORE_SCHEMA)}
    assert len(scored) == len(questions)
    assert [r["question_id"] for r in kept] == [
        q["question_id"]
        for q in questions
        if scored[q["question_id"]]["status"] == "scored" and 3 <= scored[q["question_id"]]["score"] <= 8
    ]
    assert KEY not in captured.out + captured.err + caplog.text
    assert _grep_tree(tmp_path, KEY) == []


def test_cli_unreachable_grader_is_one_error_line(tmp_path: Path, capsys) -> None:
    q_uri, _ = two_shards(tmp_path)
    argv = ["filter-difficulty", q_uri, "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    rc = main([*argv, "--low", "1", "--high", "5", "--out", str(tmp_path / "o"), "--max-attempts", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error: teacher 'm' at http://127.0.0.1:9/v1" in err and "none succeeded" in err
    assert KEY not in err


def test_state_and_outputs_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    q_uri, questions = two_shards(tmp_path)
    out, filtered = f"{s3_bucket}/grading", f"{s3_bucket}/filtered"
    with start_sandbox() as sb:
        result = filter_by_difficulty(
            q_uri, out, filtered, teacher=grader(sb.base_url), low=2, high=6, **FAST
        )
        again = filter_by_difficulty(q_uri, out, filtered, teacher=grader(sb.base_url), low=2, high=6, **FAST)
        assert sb.stats()["requests"] == len(questions) and again["new_scores"] == 0
    kept = [r["question_id"] for r in read(filtered, QUESTION_SCHEMA)]
    assert kept == [q["question_id"] for q in questions if 2 <= expected_score(q) <= 6]
    assert result["kept"] == again["kept"] == len(kept)
    assert storage.read_json(storage.join(out, "difficulty", "summary.json"))["kept"] == len(kept)
