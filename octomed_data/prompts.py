"""Versioned prompt templates for teacher sampling.

The system prompt asks for step-by-step reasoning and then exactly one final line in a form
:mod:`octomed_data.answers` reads (``Final answer: \\boxed{X}``). ``PROMPT_VERSION`` is stored
with every sample and is part of its key: change the wording -> bump the version -> new samples.
Images are sent as base64 data URLs (OpenAI / vLLM vision format), read through the storage layer.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import Any

from octomed_data.schema import TaskType, options_of

PROMPT_VERSION = "octomed-v1"
# Direct prompting (evaluation only): the answer line without any reasoning. Versioned separately
# so that predictions made with it are never mistaken for chain-of-thought ones.
DIRECT_PROMPT_VERSION = "octomed-direct-v1"
PROMPTINGS = ("cot", "direct")

_REASON = (
    "You are a medical expert. Reason step by step about the question, then end your reply "
    "with exactly one line of the form "
)

SYSTEM_PROMPTS: dict[str, str] = {
    "choice": _REASON + "'Final answer: \\boxed{X}' where X is the letter of the single best option.",
    "yes_no_maybe": _REASON + "'Final answer: \\boxed{X}' where X is one of yes, no or maybe.",
    "open": _REASON + "'Final answer: \\boxed{X}' where X is a short answer of a few words.",
}


# Training exports whose replies keep the teachers' own answer forms (``export.answer_format:
# as_is``) use these: the same instruction without a format the data would not follow.
_REASON_FREE = (
    "You are a medical expert. Reason step by step about the question, then state your final answer: "
)
FREE_FORM_SYSTEM_PROMPTS: dict[str, str] = {
    "choice": _REASON_FREE + "the letter of the single best option.",
    "yes_no_maybe": _REASON_FREE + "yes, no or maybe.",
    "open": _REASON_FREE + "a short answer of a few words.",
}
# The line SYSTEM_PROMPTS ask for; the export normalises accepted replies to end with it.
FINAL_ANSWER_LINE = "Final answer: \\boxed{{{answer}}}"


_DIRECT = (
    "You are a medical expert. Answer directly, without explanation or reasoning: reply with "
    "exactly one line of the form "
)

DIRECT_SYSTEM_PROMPTS: dict[str, str] = {
    "choice": _DIRECT + "'Final answer: \\boxed{X}' where X is the letter of the single best option.",
    "yes_no_maybe": _DIRECT + "'Final answer: \\boxed{X}' where X is one of yes, no or maybe.",
    "open": _DIRECT + "'Final answer: \\boxed{X}' where X is a short answer of a few words.",
}


def system_prompt(task_type: str | TaskType, prompting: str = "cot", *, answer_line: bool = True) -> str:
    """The system prompt for a task type: step-by-step reasoning (``cot``) or the answer alone (``direct``).

    ``answer_line=False`` (``cot`` only): the prompt states no answer-line format (for training
    data whose replies end in the teachers' own forms).
    """
    if prompting not in PROMPTINGS:
        raise ValueError(f"unknown prompting {prompting!r}; expected one of {PROMPTINGS}")
    if not answer_line and prompting != "cot":
        raise ValueError("answer_line=False is only defined for cot prompting")
    prompts = SYSTEM_PROMPTS if prompting == "cot" else DIRECT_SYSTEM_PROMPTS
    if not answer_line:
        prompts = FREE_FORM_SYSTEM_PROMPTS
    task = TaskType(task_type)
    if task.is_multiple_choice:
        return prompts["choice"]
    if task == TaskType.YES_NO_MAYBE:
        return prompts["yes_no_maybe"]
    return prompts["open"]


def prompt_version(prompting: str = "cot") -> str:
    """The version string stored with predictions made with ``prompting``."""
    return PROMPT_VERSION if prompting == "cot" else DIRECT_PROMPT_VERSION


def render_question(row: Mapping[str, Any]) -> str:
    """The user turn's text: the question, then its options one per line as ``A. text``."""
    parts = [f"Question:\n{row['question'].strip()}"]
    opts = options_of(row)
    if opts:
        parts.append("Options:\n" + "\n".join(f"{label}. {text}" for label, text in opts))
    return "\n\n".join(parts)


def _mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def image_data_url(data: bytes) -> str:
    return f"data:{_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def build_messages(
    row: Mapping[str, Any],
    *,
    read_image: Callable[[str], bytes] | None = None,
    prompting: str = "cot",
) -> list[dict[str, Any]]:
    """Chat messages for one question row (images as data URLs before the text)."""
    if read_image is None:
        from octomed_data.storage import read_bytes as read_image
    text = render_question(row)
    images = row.get("images") or []
    if images:
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": image_data_url(read_image(im["uri"]))}}
            for im in images
        ]
        content.append({"type": "text", "text": text})
        user: dict[str, Any] = {"role": "user", "content": content}
    else:
        user = {"role": "user", "content": text}
    return [{"role": "system", "content": system_prompt(row["task_type"], prompting)}, user]


# ---------------------------------------------------------------------------- the verifier's judge
# The LLM judge of open-ended answers (:mod:`octomed_data.verify`). The version is part of every
# judgement's journal key and of the filter stage's fingerprint: change the wording -> bump it ->
# every judged answer is judged again.
JUDGE_RUBRIC_VERSION = "judge-rubric-v1"
JUDGE_SYSTEM_PROMPT = (
    "You are grading a candidate answer against a reference answer to a medical question. "
    "The candidate is correct when it means the same as the reference: synonyms, abbreviations, "
    "equivalent numbers and units, and extra words that do not change the meaning are fine; a "
    "different, broader, narrower or hedged answer is incorrect. Reply with one short line of "
    "reasons, then exactly one final line: 'VERDICT: CORRECT' or 'VERDICT: INCORRECT'."
)
JUDGE_REFERENCE = "Reference answer:"
JUDGE_CANDIDATE = "Candidate answer:"


def judge_messages(question: str, reference: str, candidate: str) -> list[dict[str, Any]]:
    """The judge's chat messages: the rubric, then the question, the reference and the candidate.

    Text only (no images): the judge compares two answers, it does not answer the question.
    The reference and the candidate come last, each on its own line, so a reader (the sandbox
    judge) finds them after whatever the question says.
    """
    user = (
        f"Question:\n{question.strip()}\n\n"
        f"{JUDGE_REFERENCE}\n{' '.join(reference.split())}\n\n"
        f"{JUDGE_CANDIDATE}\n{' '.join(candidate.split())}"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]
