"""Units of the distillation stack: teacher config, reasoning split, stats, CLI errors.

Rate budgets: ``tests/inference/test_ratelimit.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from cli import main
from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.schema import VERDICT_SCHEMA
from octomed_data.stats import source_statistics
from octomed_data.teachers import DistillConfig, TeacherConfig, resolve_api_key


def _teacher(**over) -> dict:
    return {"name": "r1", "base_url": "http://x/v1", "model": "deepseek-reasoner", **over}


def test_routing_text_and_multimodal() -> None:
    cfg = DistillConfig.parse(
        {
            "teachers": [_teacher(), _teacher(name="gpt4o", model="gpt-4o")],
            "routing": {"text": "r1", "multimodal": "gpt4o", "open_qa": "gpt4o"},
        }
    )
    assert cfg.teacher_for("text_mcq").name == "r1"
    assert cfg.teacher_for("yes_no_maybe").name == "r1"
    assert cfg.teacher_for("mm_mcq").name == "gpt4o"
    assert cfg.teacher_for("open_qa").name == "gpt4o"
    with pytest.raises(ConfigError, match="unknown teacher"):
        DistillConfig.parse({"teachers": [_teacher()], "routing": {"text": "nobody"}})
    with pytest.raises(ConfigError, match="no teacher routed"):
        DistillConfig.parse({"teachers": [_teacher(), _teacher(name="b")]}).teacher_for("text_mcq")
    with pytest.raises(ConfigError, match="api_key"):
        DistillConfig.parse({"teachers": [_teacher(api_key="sk-inline")]})


def test_params_hash_tracks_sampling_params() -> None:
    a = TeacherConfig(**_teacher())
    assert a.params_hash() == TeacherConfig(**_teacher(max_in_flight=3, rpm=5)).params_hash()
    assert a.params_hash() != TeacherConfig(**_teacher(temperature=0.7)).params_hash()
    assert a.params_hash() != TeacherConfig(**_teacher(extra_body={"top_k": 20})).params_hash()


def test_api_key_from_env_or_secret_block(monkeypatch) -> None:
    t = TeacherConfig(**_teacher(api_key_env="MY_TEACHER_KEY", api_key_secret="deepseek-key"))
    monkeypatch.delenv("MY_TEACHER_KEY", raising=False)
    with pytest.raises(ConfigError, match="MY_TEACHER_KEY.*deepseek-key"):
        resolve_api_key(t)
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-env-value")
    key = resolve_api_key(t)
    assert key.get_secret_value() == "sk-env-value" and "sk-env-value" not in repr(key)
    assert resolve_api_key(t, {"r1": SecretStr("sk-block")}).get_secret_value() == "sk-block"


def _row(qid: str, source: str, idx: int, correct: bool, reason: str | None = None) -> dict:
    return {
        "question_id": qid,
        "source": source,
        "task_type": "text_mcq",
        "sample_idx": idx,
        "seed": idx,
        "teacher": "r1",
        "model": "m",
        "prompt_version": "v",
        "params_hash": "h",
        "reasoning": "x" * (100 * (idx + 1)),
        "response": "Answer: A",
        "gold_answer": "A",
        "correct": correct,
        "reject_reason": None if correct else (reason or "wrong_answer"),
    }


def test_source_statistics_flag_too_easy_sources(tmp_path: Path) -> None:
    rows = []
    for q in range(4):  # easy: 14/16 correct per question -> rejection 12.5% -> flagged
        rows += [_row(f"e{q}", "easy", i, i < 14) for i in range(16)]
    for q in range(4):  # hard: question h0 has 3 correct, the rest none; one failed request
        rows += [_row(f"h{q}", "hard", i, q == 0 and i < 3) for i in range(15)]
        rows.append(_row(f"h{q}", "hard", 15, False, "request_failed"))
    for r in rows:  # the filter stage's verdict rows carry the reasoning length, not the text
        r["reasoning_chars"] = len(r["reasoning"])
        r["reasoning_words"] = len(r["reasoning"].split())
    storage.Dataset(str(tmp_path / "verdicts"), VERDICT_SCHEMA).write_shard("00000", rows)
    stats = source_statistics(str(tmp_path / "verdicts"), samples_per_question=16)
    easy, hard = stats["sources"]["easy"], stats["sources"]["hard"]
    assert easy["pass_rate"] == 0.875 and easy["too_easy"] is True and easy["pass@16"] == 1.0
    assert hard["samples"] == 60 and hard["failed_requests"] == 4 and hard["accepted"] == 3
    assert hard["questions_without_accepted"] == 3 and hard["pass@16"] == 0.25
    assert hard["too_easy"] is False and hard["reject_reasons"] == {"wrong_answer": 57}
    assert easy["reasoning_chars"]["max"] == 1600 and easy["reasoning_chars"]["p50"] == 900
    assert stats["overall"]["samples"] == 124


def test_cli_errors_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert main(["distill", str(tmp_path / "nope"), "--model", "m", "--out", str(tmp_path / "o")]) == 2
    assert "give --base-url and --model" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers: [{name: a, base_url: u, model: m, temperature: 9}]\n")
    assert main(["distill", "q", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid") and "temperature" in err and len(err.strip().splitlines()) == 1
    rc = main(
        [
            "distill",
            str(tmp_path / "nope"),
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "no committed question shards" in capsys.readouterr().err


def test_cli_unreachable_teacher_fails_with_a_summary(tmp_path: Path, capsys, monkeypatch) -> None:
    from tests.support.distill import make_questions

    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    make_questions(str(tmp_path / "q"), 5)
    rc = main(
        [
            "distill",
            str(tmp_path / "q"),
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
            "--samples",
            "2",
            "--max-attempts",
            "1",
            "--no-progress",
            "--executor",
            "local",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "0/10 samples stored" in err
    assert "error: teacher 'm' at http://127.0.0.1:9/v1" in err and "none succeeded" in err
