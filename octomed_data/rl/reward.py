"""RL rewards: the rejection filter's own verdict on a policy's completion, and an optional format reward.

**Correctness** is 1.0 exactly when :func:`octomed_data.rejection.judge` (the filter's verdict:
refusal and truncation rules, THE answer extractor, the :class:`~octomed_data.verify.Verifier` of
the ``verify:`` settings) says the completion is correct, else 0.0. The completion is judged as
the filter judges a teacher's reply: the whole text is the ``response`` (the extractor reads only
what follows ``</think>``, and a completion still inside ``<think>`` states no answer).

**Open answers and the LLM judge**: ``exact`` and ``normalized`` sources need no request. A source
in ``judge`` mode needs the judge for the open answers normalized matching does not accept, through
the one inference client (:func:`octomed_data.verify.judge.ajudge`, journalled like the filter's):
pass ``judge=`` a :class:`~octomed_data.verify.judge.JudgeEndpoint` (the filter's teacher and key,
a journal folder of the RL job's own). Each reward call judges what its batch needs first (one
synchronous pass, ``asyncio.run``; journalled under a shard named by the batch's content, so a
repeated batch costs nothing) and then decides every completion. Without an endpoint such settings
fail when the reward functions are made, in one line (:class:`JudgeRewardsNeedEndpoint`); a judge
request that fails after every attempt fails the reward call (:class:`~octomed_data.verify.judge.JudgeIncomplete`),
as it fails the filter: a reward is never a guess.

**Format** (``format_weight`` > 0): ``format_weight`` when the completion closes its thinking (no
``<think>`` left open) and its last line is the answer line the system prompt asks for
(``Final answer: \\boxed{X}``) with an answer the extractor reads, else 0.0. It assumes the SFT
export's ``answer_format: normalize`` (the system prompt names that line).

Each reward function has TRL's signature ``fn(prompts, completions, **columns) -> list[float]``
(``columns``: the RL data's columns as lists) and a ``__name__`` TRL logs it by.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from octomed_data.answers import extract_answer
from octomed_data.answers.forms import BOXED, THINK
from octomed_data.errors import ConfigError
from octomed_data.prompts import PROMPT_VERSION
from octomed_data.rejection import judge
from octomed_data.schema import TaskType
from octomed_data.verify import Verifier, VerifySettings
from octomed_data.verify.judge import JudgeEndpoint, JudgeIncomplete, ajudge, read_judgements

POLICY_MODEL = "rl-policy"  # the ``model`` of a completion's judge key (the policy is no teacher)
ANSWER_LINE_PREFIX = "Final answer:"
RewardFn = Callable[..., list[float]]


class JudgeRewardsNeedEndpoint(ConfigError):
    """The verify settings send open answers to the LLM judge, and no judge endpoint was given."""


def judge_sources(settings: VerifySettings) -> list[str]:
    """Where the settings decide open answers with the judge: source names, ``*`` for the default."""
    out = ["*"] if settings.default == "judge" else []
    return out + sorted(n for n in settings.sources if settings.mode_for(n) == "judge")


def completion_text(completion: Any) -> str:
    """A completion's text: a string, or a conversation's last assistant message (text parts joined)."""
    if completion is None or isinstance(completion, str):
        return completion or ""
    messages = [m for m in completion if isinstance(m, Mapping)]
    replies = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
    content = replies[-1].get("content") if replies else ""
    if isinstance(content, str):
        return content
    return "".join(
        str(p.get("text") or "") for p in content or [] if isinstance(p, Mapping) and p.get("type") == "text"
    )


def row_options(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A row's (label, text) options: QUESTION_SCHEMA structs, or (label, text) pairs."""
    out = []
    for o in row.get("options") or []:
        if isinstance(o, Mapping):
            out.append((str(o["label"]), str(o["text"])))
        else:
            label, text = o
            out.append((str(label), str(text)))
    return out


def judged_row(completion: Any, row: Mapping[str, Any]) -> dict[str, Any]:
    """The row the filter's verdict reads for a completion of the question ``row`` (RL data or question row)."""
    text = completion_text(completion)
    gold = row.get("gold_answer")
    return {
        "question_id": str(row.get("question_id") or ""),
        "source": str(row.get("source") or ""),
        "task_type": row["task_type"],
        "gold_answer": gold if gold is not None else row["answer"],
        "response": text,
        "finish_reason": row.get("finish_reason"),
        # The judge key of a completion: the policy's, per question and completion text.
        "model": POLICY_MODEL,
        "prompt_version": PROMPT_VERSION,
        "params_hash": "rl",
        "sample_idx": int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big") >> 1,
    }


def verdict(completion: Any, row: Mapping[str, Any], verifier: Verifier | None = None) -> dict[str, Any]:
    """The rejection filter's verdict on one completion (:func:`octomed_data.rejection.judge`)."""
    return judge(judged_row(completion, row), row_options(row), verifier)


def correctness_reward(
    completion: Any,
    row: Mapping[str, Any],
    *,
    verify: VerifySettings | None = None,
    judge: JudgeEndpoint | None = None,
) -> float:
    """1.0 when the filter's verdict says the completion of ``row``'s question is correct, else 0.0."""
    batch = (
        _default_batch()
        if verify is None and judge is None
        else BatchJudge(verify or VerifySettings(), judge)
    )
    return batch.rewards([completion], {k: [v] for k, v in row.items()})[0]


_DEFAULT: list[BatchJudge] = []


def _default_batch() -> BatchJudge:
    """The default settings' (exact match) judge, built once per process."""
    if not _DEFAULT:
        _DEFAULT.append(BatchJudge(VerifySettings(), None))
    return _DEFAULT[0]


def format_ok(completion: Any, row: Mapping[str, Any]) -> bool:
    """Thinking closed and a last line ``Final answer: \\boxed{X}`` whose X the extractor reads."""
    text = THINK.sub(" ", completion_text(completion))
    low = text.lower()
    if "</think>" in low:  # a chat template that opened <think> in the prompt: the completion closes it
        text = text[low.rindex("</think>") + len("</think>") :]
    if "<think>" in text.lower():
        return False
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines or not lines[-1].startswith(ANSWER_LINE_PREFIX):
        return False
    boxed = lines[-1][len(ANSWER_LINE_PREFIX) :].strip()
    if not BOXED.fullmatch(boxed):
        return False
    return extract_answer(lines[-1], TaskType(row["task_type"]), row_options(row)).answer is not None


def _needs_endpoint(settings: VerifySettings) -> str:
    return (
        f"the verify settings decide open answers of {', '.join(judge_sources(settings))} with the LLM "
        "judge: judge rewards need a judge endpoint (reward_functions(..., judge=JudgeEndpoint(...)), the "
        "filter's judge teacher and key), or set those sources' verify mode to normalized for RL"
    )


def _rows(n: int, columns: Mapping[str, Any]) -> list[dict[str, Any]]:
    """TRL's per-column lists as one mapping per completion."""
    lists = {k: v for k, v in columns.items() if isinstance(v, list | tuple) and len(v) == n}
    return [{k: v[i] for k, v in lists.items()} for i in range(n)]


class BatchJudge:
    """Judges what one batch of completions needs (the filter's judge pass), then decides them all."""

    def __init__(self, settings: VerifySettings, endpoint: JudgeEndpoint | None) -> None:
        if judge_sources(settings) and endpoint is None:
            raise JudgeRewardsNeedEndpoint(_needs_endpoint(settings))
        self.settings = settings
        self.endpoint = endpoint
        self.plain = Verifier(settings)  # no judge: one verifier for every call (its matcher built once)

    def verifier(self, rows: Sequence[tuple[dict[str, Any], list[tuple[str, str]], str]]) -> Verifier:
        if self.endpoint is None or not judge_sources(self.settings):
            return self.plain
        verifier = Verifier(self.settings, self.endpoint.teacher)
        jobs = {}
        for row, options, question in rows:
            ex = extract_answer(row["response"], TaskType(row["task_type"]), options)
            if ex.answer is None or row.get("finish_reason") == "length":
                continue
            job = verifier.open_job(row, ex, question)
            if job is not None:
                jobs[job.key] = job
        if not jobs:
            return verifier
        shard = "rl-" + hashlib.blake2b("\n".join(sorted(jobs)).encode(), digest_size=8).hexdigest()
        done = read_judgements(self.endpoint.journal, shard)
        todo = [j for k, j in jobs.items() if k not in done]
        if todo:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                raise ConfigError("judge rewards are computed synchronously: call them outside an event loop")
            report = asyncio.run(ajudge(iter(todo), self.endpoint, shard))
            if report.failed or report.aborted:
                raise JudgeIncomplete(
                    f"reward batch {shard}: {report.failed} judge request(s) failed"
                    + (f" ({report.aborted})" if report.aborted else "")
                )
            done = read_judgements(self.endpoint.journal, shard)
        verifier.judgements = done
        return verifier

    def rewards(self, completions: Sequence[Any], columns: Mapping[str, Any]) -> list[float]:
        rows = []
        for completion, row in zip(completions, _rows(len(completions), columns), strict=True):
            rows.append((judged_row(completion, row), row_options(row), str(row.get("question") or "")))
        verifier = self.verifier(rows)
        return [1.0 if judge(r, options, verifier)["correct"] else 0.0 for r, options, _ in rows]


def reward_functions(
    verify: VerifySettings | None = None,
    format_weight: float = 0.0,
    *,
    judge: JudgeEndpoint | None = None,
) -> list[RewardFn]:
    """TRL reward functions: ``correctness`` (the filter's verdict), and ``format`` when ``format_weight`` > 0
    (already weighted: leave TRL's ``reward_weights`` unset). ``judge``: see the module doc."""
    batch = BatchJudge(verify or VerifySettings(), judge)

    def correctness(prompts: Any = None, completions: Sequence[Any] = (), **columns: Any) -> list[float]:
        return batch.rewards(completions, columns)

    out: list[RewardFn] = [correctness]
    if format_weight > 0:

        def format(prompts: Any = None, completions: Sequence[Any] = (), **columns: Any) -> list[float]:  # noqa: A001
            rows = _rows(len(completions), columns)
            return [format_weight if format_ok(c, r) else 0.0 for c, r in zip(completions, rows, strict=True)]

        out.append(format)
    return out
