"""RL rewards (issue 27): the rejection filter's verdict, on the project's answer corpora and the filter itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pydantic import SecretStr

from octomed_data import storage
from octomed_data.layout import FilterFolder
from octomed_data.rejection import filter_shard, judge
from octomed_data.rl.reward import (
    JudgeRewardsNeedEndpoint,
    correctness_reward,
    format_ok,
    judged_row,
    reward_functions,
    row_options,
)
from octomed_data.sandbox import start_sandbox
from octomed_data.schema import ACCEPTED_SCHEMA, QUESTION_SCHEMA, SAMPLE_SCHEMA, VERDICT_SCHEMA
from octomed_data.teachers import TeacherConfig
from octomed_data.verify import Verifier, VerifySettings
from octomed_data.verify.judge import JudgeEndpoint
from tests.support.rl import open_question

CORPUS = Path(__file__).resolve().parents[1] / "answer_corpus"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, CORPUS / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


third_party = _load("rl_third_party_corpus", "third_party.py")
regression = _load("rl_regression_corpus", "corpus.py")


def corpus_rows() -> list[tuple[str, dict]]:
    """(reply, RL row) for every reply of both answer corpora: the third-party replies (both splits)
    with their questions' gold answers; the regression corpus's with the answer each states as gold
    and, again, with another option as gold (so both verdicts occur for the same replies)."""
    out = []
    for split in third_party.SPLITS:
        for r in third_party.rows(split):
            opts = [{"label": k, "text": v} for k, v in third_party.options(r)]
            out.append(
                (
                    r["reply"],
                    {
                        "question_id": r["id"],
                        "source": r["benchmark"],
                        "task_type": r["task_type"],
                        "gold_answer": r["gold"],
                        "options": opts,
                    },
                )  # fmt: skip
            )
    for r in regression.ROWS:
        opts = [{"label": str(k), "text": str(v)} for k, v in r["options"]]
        labels = [o["label"] for o in opts] or ["yes", "no", "maybe"]
        if r["task_type"] == "yes_no_maybe":
            labels = ["yes", "no", "maybe"]
        stated = r["expected_answer"] or labels[0]
        for gold in (stated, next(x for x in labels if x != stated)):
            row = {"question_id": r["id"], "source": "regression", "task_type": r["task_type"]}
            out.append((r["reply"], row | {"gold_answer": gold, "options": opts}))
    return out


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, dict]]:
    return corpus_rows()


def write_filter_inputs(root: Path, items: list[tuple[str, dict]], question_text: dict | None = None):
    """The replies as distillation writes them (SAMPLE_SCHEMA, one shard) and their questions."""
    questions, samples, seen = [], [], set()
    for i, (reply, row) in enumerate(items):
        qid = row["question_id"]
        if qid not in seen:
            seen.add(qid)
            questions.append(
                {"question_id": qid, "source": row["source"], "split": "train", "task_type": row["task_type"],
                 "question": (question_text or {}).get(qid, "q"), "options": row["options"],
                 "answer": row["gold_answer"], "images": [], "input_file": "x", "record_index": i}
            )  # fmt: skip
        samples.append(
            {"question_id": qid, "source": row["source"], "task_type": row["task_type"], "sample_idx": i,
             "seed": i, "teacher": "t", "model": "m", "prompt_version": "p", "params_hash": "h",
             "reasoning": None, "response": reply, "finish_reason": "stop",
             "gold_answer": row["gold_answer"], "correct": False, "created_at": None}
        )  # fmt: skip
    q_uri, raw_uri = str(root / "questions"), str(root / "raw")
    storage.Dataset(q_uri, QUESTION_SCHEMA).write_shard(0, questions)
    storage.Dataset(raw_uri, SAMPLE_SCHEMA).write_shard(0, samples)
    return q_uri, raw_uri


def filter_verdicts(
    root: Path, items, settings: VerifySettings, endpoint=None, question_text=None
) -> list[bool]:
    """The filter stage's own verdicts (``filter_shard``) on the replies, in order."""
    q_uri, raw_uri = write_filter_inputs(root, items, question_text)
    out = FilterFolder(str(root / "filter"))
    filter_shard(raw_uri, q_uri, "00000", out.verdicts, str(root / "accepted"), verify=settings,
                 judge_endpoint=endpoint)  # fmt: skip
    got = storage.Dataset(out.verdicts, VERDICT_SCHEMA).read_all().to_pylist()
    assert storage.Dataset(str(root / "accepted"), ACCEPTED_SCHEMA).is_committed("00000")
    return [r["correct"] for r in sorted(got, key=lambda r: r["sample_idx"])]


@pytest.fixture(scope="module")
def rewards(rows) -> list[float]:
    """The correctness reward of every corpus reply, as TRL calls it (one batch, columns as lists)."""
    fns = reward_functions(VerifySettings())
    keys = ("question_id", "source", "task_type", "gold_answer", "options")
    columns = {k: [row[k] for _, row in rows] for k in keys}
    return fns[0](prompts=[None] * len(rows), completions=[reply for reply, _ in rows], **columns)


def test_reward_agrees_with_the_rejection_filter_on_every_corpus_reply(rows, rewards, tmp_path):
    """Correctness is 1.0 exactly when the filter accepts the reply: checked against the filter
    stage's own verdicts (filter_shard) on every reply of both answer corpora."""
    accepted = filter_verdicts(tmp_path, rows, VerifySettings())
    assert len(rewards) == len(accepted) == len(rows) >= 9000
    disagree = [(rows[i][1]["question_id"], r, a) for i, (r, a) in enumerate(zip(rewards, accepted, strict=True))
                if r != (1.0 if a else 0.0)]  # fmt: skip
    assert not disagree, disagree[:10]
    assert 0.25 < sum(rewards) / len(rewards) < 0.75  # both verdicts, in number
    # One completion at a time, and as a conversation, give the same rewards.
    fns = reward_functions()
    for (reply, row), want in list(zip(rows, rewards, strict=True))[::97]:
        assert want == (
            1.0 if judge(judged_row(reply, row), row_options(row), Verifier())["correct"] else 0.0
        )
        assert correctness_reward(reply, row) == want
        assert fns[0](
            None, [[{"role": "assistant", "content": reply}]], **{k: [v] for k, v in row.items()}
        ) == [want]


def test_reward_is_no_accept_of_a_reply_that_states_another_answer(rows, rewards):
    """On the third-party replies, against the labels their authors published (adjudicated): a
    reply rewarded 1.0 states the gold answer (at most 0.1% state none, the extractor's bound)."""
    tp = {r["id"]: r for s in third_party.SPLITS for r in third_party.rows(s)}
    rewarded = [
        row for (_, row), r in zip(rows, rewards, strict=True) if row["question_id"] in tp and r == 1.0
    ]
    wrong = [
        r["question_id"] for r in rewarded if tp[r["question_id"]]["expected"] not in (None, r["gold_answer"])
    ]
    none = [r for r in rewarded if tp[r["question_id"]]["expected"] is None]
    assert len(rewarded) > 1000 and not wrong, wrong[:10]
    assert len(none) <= 0.001 * len(tp)


def test_open_answers_follow_the_verify_settings(tmp_path):
    qs = [open_question(i) for i in range(3)]
    rows = [{k: q[k] for k in ("question_id", "source", "task_type", "options")} | {"gold_answer": q["answer"]}
            for q in qs]  # fmt: skip
    replies = ["<think>\nhm\n</think>\n\nFinal answer: \\boxed{Vellum glands 0}",
               "Final answer: \\boxed{vellum gland 1}", "Final answer: \\boxed{the spleen}"]  # fmt: skip
    exact = [correctness_reward(c, r) for c, r in zip(replies, rows, strict=True)]
    normalized = VerifySettings(default="normalized")
    loose = [correctness_reward(c, r, verify=normalized) for c, r in zip(replies, rows, strict=True)]
    assert exact == [0.0, 1.0, 0.0] and loose == [1.0, 1.0, 0.0]
    items = list(zip(replies, rows, strict=True))
    assert filter_verdicts(tmp_path / "e", items, VerifySettings()) == [bool(x) for x in exact]
    assert filter_verdicts(tmp_path / "n", items, normalized) == [bool(x) for x in loose]


def test_judge_rewards_use_the_filters_judge_and_its_journal(tmp_path):
    """In judge mode, the rewards ask the judge what the filter would (through the one inference
    client, journalled): the same verdicts as the filter with the same judge; a repeated batch asks nothing."""
    settings = VerifySettings(default="judge")
    with pytest.raises(JudgeRewardsNeedEndpoint, match="judge rewards need a judge endpoint"):
        reward_functions(settings)
    qs = [open_question(i) for i in range(4)]
    text = {q["question_id"]: q["question"] for q in qs}
    rows = [{k: q[k] for k in ("question_id", "source", "task_type", "options", "question")}
            | {"gold_answer": q["answer"]} for q in qs]  # fmt: skip
    replies = ["Final answer: \\boxed{the Vellum-0 gland}", "Final answer: \\boxed{vellum gland 1}",
               "Final answer: \\boxed{the spleen}", "Final answer: \\boxed{blue humour filter 3}"]  # fmt: skip
    with start_sandbox() as sb:
        teacher = TeacherConfig(name="judge", base_url=sb.base_url, model="sandbox-judge", temperature=0.0)

        def endpoint(journal: Path) -> JudgeEndpoint:
            return JudgeEndpoint(teacher, SecretStr("sk-test-judge"), str(journal), max_attempts=2)

        def asked() -> int:
            return sum(1 for e in sb.stats()["log"] if e["kind"] == "judge")

        fns = reward_functions(settings, judge=endpoint(tmp_path / "rl_judge"))
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        rewards = fns[0](None, replies, **columns)
        n = asked()
        assert n == 3  # "vellum gland 1" is accepted by normalized matching, no request
        assert fns[0](None, replies, **columns) == rewards and asked() == n  # journalled
        items = [
            (c, {k: v for k, v in r.items() if k != "question"}) for c, r in zip(replies, rows, strict=True)
        ]
        accepted = filter_verdicts(tmp_path / "f", items, settings, endpoint(tmp_path / "f_judge"), text)
    assert rewards == [1.0 if a else 0.0 for a in accepted]
    assert rewards[1] == 1.0 and rewards[2] == 0.0


def test_format_reward_wants_the_answer_line_and_closed_thinking():
    row = {"task_type": "text_mcq", "options": [{"label": "A", "text": "x"}, {"label": "B", "text": "y"}],
           "gold_answer": "B"}  # fmt: skip
    good = "<think>\nSo B.\n</think>\n\nIt is y.\nFinal answer: \\boxed{B}"
    assert format_ok(good, row) and format_ok("reasoning\n</think>\nFinal answer: \\boxed{A}", row)
    for bad in (
        "<think>\nstill thinking. Final answer: \\boxed{B}",  # thinking never closed
        "<think>\nx\n</think>\n\nThe answer is B.",  # no answer line
        "<think>\nx\n</think>\n\nFinal answer: \\boxed{B}\nHope this helps.",  # not the last line
        "Final answer: B",  # not boxed
        "",
    ):
        assert not format_ok(bad, row), bad
    fns = reward_functions(format_weight=0.25)
    assert [f.__name__ for f in fns] == ["correctness", "format"]
    cols = {k: [v, v] for k, v in row.items()}
    assert fns[1](None, [good, "Final answer: B"], **cols) == [0.25, 0.0]
    assert fns[0](None, [good, "Final answer: B"], **cols) == [1.0, 1.0]  # correct either way
    assert [f.__name__ for f in reward_functions()] == ["correctness"]
