"""An exported conversation: the turns of one mixture row before they take a format's form
(:mod:`octomed_data.export`): the teacher's prompts, the reasoning, the reply normalised to the answer
line the system prompt asks for, and the side columns."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from octomed_data.answers import extract_answer, is_correct
from octomed_data.errors import ConfigError
from octomed_data.prompts import FINAL_ANSWER_LINE, render_question, system_prompt
from octomed_data.schema import VERIFIER_FIELDS, options_of

ANSWER_FORMATS = ("normalize", "as_is")
# What of a trace the assistant turn carries: the reasoning and the reply, or the answer line alone.
CONTENTS = ("reasoning", "answer_only")
IMAGE_REFS = ("relative", "absolute")
IMAGE_DIR = "images"
IMAGE_TOKEN = "<image>"
# 4: duplicates dropped after answer normalisation, LLaMA-Factory's text-only dataset, TRL images
# referenced in the run's store by default; 3: the verifier's provenance as side columns
EXPORT_VERSION = "4"
# A last line at most this long that states the reply's answer is an answer line: it is replaced
# by the normalised one. Longer lines carry explanation, so the normalised line is appended.
ANSWER_LINE_MAX_CHARS = 80
# LLaMA-Factory counts these placeholders in text; a literal one in a trace would break the
# image/token alignment, so it is rewritten to a visibly different, harmless form.
_PLACEHOLDER_ESCAPES = {"<image>": "<image\u200b>", "<video>": "<video\u200b>", "<audio>": "<audio\u200b>"}


def escape_placeholders(text: str | None) -> tuple[str, int]:
    """Rewrite literal ``<image>``/``<video>``/``<audio>`` so they are not placeholder tokens."""
    if not text:
        return text or "", 0
    n = 0
    for token, repl in _PLACEHOLDER_ESCAPES.items():
        k = text.count(token)
        if k:
            text = text.replace(token, repl)
            n += k
    return text, n


def user_text(row: Mapping[str, Any]) -> str:
    """The question exactly as the teacher saw it (and as evaluation asks it)."""
    return render_question(row)


def final_answer_line(answer: str) -> str:
    """The answer line the system prompt asks for: ``Final answer: \\boxed{answer}``."""
    return FINAL_ANSWER_LINE.format(answer=answer)


def normalize_reply(
    response: str | None,
    task_type: str,
    options: Sequence[tuple[str, str]] = (),
    accepted: str | None = None,
) -> tuple[str | None, str]:
    """``(response ending in the normalised answer line, action)``; ``(None, "dropped")`` when the
    reply does not read as ``accepted`` (the answer rejection sampling accepted).

    Actions: ``kept`` (already ends in the line), ``replaced`` (a short final answer line was
    replaced), ``appended`` (the line was added after the response).
    """
    text = (response or "").strip()
    read = extract_answer(text, task_type, options)
    answer = read.answer
    if answer is None or (accepted is not None and not is_correct(answer, accepted, task_type)):
        return None, "dropped"
    line = final_answer_line(answer)
    lines = text.split("\n")
    last = lines[-1].strip()
    if last == line:
        return text, "kept"
    attempts = []
    if len(last) <= ANSWER_LINE_MAX_CHARS:
        own = extract_answer(last, task_type, options).answer
        if own is not None and is_correct(own, answer, task_type):
            attempts.append(("\n".join([*lines[:-1], line]).strip(), "replaced"))
    attempts.append((f"{text}\n\n{line}".strip(), "appended"))
    for candidate, action in attempts:
        # The normalised reply must still read as the same answer (e.g. nothing later retracts it).
        check = extract_answer(candidate, task_type, options).answer
        if check is not None and is_correct(check, answer, task_type):
            return candidate, action
    return None, "dropped"


@dataclass
class Turns:
    """One exported conversation before it takes a framework's form."""

    system: str
    user: str  # without image tokens
    assistant: str
    images: list[dict[str, Any]]
    escaped: int
    answer: str  # kept / replaced / appended / as_is
    # What makes two rows the same training example (:func:`trace_key`): equal keys are duplicates.
    key: bytes = b""


def check_settings(answer_format: str, content: str) -> None:
    """A ConfigError, in one line, for an unknown answer format or content (or answer-only as is)."""
    if answer_format not in ANSWER_FORMATS:
        raise ConfigError(f"unknown answer_format {answer_format!r}; choose from {list(ANSWER_FORMATS)}")
    if content not in CONTENTS:
        raise ConfigError(f"unknown export content {content!r}; choose from {list(CONTENTS)}")
    if content == "answer_only" and answer_format != "normalize":
        raise ConfigError("answer_only export needs answer_format normalize (its reply is the answer line)")


def export_system_prompt(task_type: str, answer_format: str = "normalize", content: str = "reasoning") -> str:
    """The system prompt of an exported row: the teacher's (cot), or direct for answer-only data."""
    if content == "answer_only":
        return system_prompt(task_type, "direct")
    return system_prompt(task_type, answer_line=answer_format == "normalize")


def prepare(
    row: Mapping[str, Any], answer_format: str = "normalize", content: str = "reasoning"
) -> Turns | None:
    """System, user and assistant text for a mixture row; ``None`` when the row is dropped."""
    check_settings(answer_format, content)
    response: str | None = (row.get("response") or "").strip()
    if answer_format == "normalize":
        response, action = normalize_reply(
            response, row["task_type"], options_of(row), row.get("extracted_answer")
        )
        if response is None:
            return None
    else:
        action = "as_is"
    user, n1 = escape_placeholders(user_text(row))
    reasoning = (row.get("reasoning") or "").strip()
    images = list(row.get("images") or [])
    key = trace_key(row, user, images, reasoning, response or "")
    if content == "answer_only":
        # The normalised reply ends in the answer line; everything before it (and the reasoning) goes.
        assistant, n2 = escape_placeholders((response or "").split("\n")[-1].strip())
    else:
        assistant, n2 = escape_placeholders(f"<think>\n{reasoning}\n</think>\n\n{response}")
    return Turns(
        system=export_system_prompt(row["task_type"], answer_format, content),
        user=user,
        assistant=assistant,
        images=images,
        escaped=n1 + n2,
        answer=action,
        key=key,
    )


def trace_key(
    row: Mapping[str, Any], user: str, images: Sequence[Mapping[str, Any]], reasoning: str, response: str
) -> bytes:
    """A 16-byte digest of what a trainer sees of a trace once its reply is normalised: task type
    (the system prompt), user turn, images (by content address), reasoning and the normalised reply,
    plus the mixture's ``copy`` index, so a weight's deliberate repeats are not duplicates.

    Two replies that differed only in how they stated the answer ("The answer is B." / "**B**")
    normalise to the same line and get the same key. The key is taken from the reasoning form in
    every content mode, so an answer-only export keeps exactly the rows of the reasoning export.
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in (
        row.get("task_type") or "",
        user,
        str(len(images)),
        *(str(im.get("sha256") or im.get("uri") or "") for im in images),
        reasoning,
        response,
        str(row.get("copy") or 0),
    ):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


def side_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """The side columns: where the trace came from and which verifier accepted it."""
    return {"question_id": row["question_id"], "source": row["source"], "teacher": row["teacher"]} | {
        name: row.get(name) for name in VERIFIER_FIELDS
    }
