"""Reading a chat-completions reply: THE place where reasoning and answer text are separated.

Servers hand back a model's reasoning in four ways, and every one must end up stored as
reasoning (distillation) or put back inline (evaluation):

- a separate field: ``message.reasoning`` (vLLM >= 0.10, SGLang, OpenRouter) or
  ``message.reasoning_content`` (DeepSeek, older vLLM);
- inline ``<think>...</think>`` in ``content`` (servers without a reasoning parser);
- only ``</think>`` in ``content`` (chat templates that open the thought in the prompt: R1, Qwen3);
- all of the reply as reasoning and ``content`` empty or null (a reasoning parser that never saw
  ``</think>``: the budget ran out mid-thought), or an unclosed ``<think>`` inline.

Works on the OpenAI SDK's objects (extra fields live in ``model_extra``) and on plain dicts (the
lean HTTP path and recorded bodies).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
# Field names servers use for parsed reasoning, in order of preference.
REASONING_FIELDS = ("reasoning_content", "reasoning")


@dataclass(frozen=True)
class Reply:
    """One choice's text, split: ``reasoning`` (None when the reply had none) and ``answer``.

    ``closed`` is False when the reply stopped inside its thought (no end-of-think was seen), so
    that nothing in it can be read as a final answer.
    """

    reasoning: str | None
    answer: str
    closed: bool = True

    def inline(self) -> str:
        """The reply as one text with the reasoning inline: ``<think>R</think>\\n\\nA`` (or unclosed)."""
        if self.reasoning is None:
            return self.answer
        if not self.closed:
            return THINK_OPEN + self.reasoning
        return THINK_OPEN + self.reasoning + THINK_CLOSE + ("\n\n" + self.answer if self.answer else "")


def _field(message: Any, name: str) -> Any:
    if isinstance(message, dict):
        return message.get(name)
    value = getattr(message, name, None)
    if value is None:
        value = (getattr(message, "model_extra", None) or {}).get(name)
    return value


def reasoning_field(message: Any) -> str | None:
    """The parsed reasoning a server returned beside ``content`` (``reasoning_content`` or ``reasoning``)."""
    for name in REASONING_FIELDS:
        value = _field(message, name)
        if isinstance(value, str) and value:
            return value
    return None


def split_reasoning(
    content: str | None, reasoning: str | None = None, finish_reason: str | None = None
) -> Reply:
    """Separate reasoning from answer text, given ``content`` and a server's reasoning field.

    With a reasoning field, ``content`` is the answer; an empty answer after a ``length`` stop
    means the parser never saw the end of the thought (``closed`` False). Without one, inline
    ``<think>`` blocks are the reasoning; an unclosed ``<think>`` makes the rest reasoning in
    progress; a lone ``</think>`` closes a thought the prompt opened.
    """
    content = content or ""
    if reasoning:
        answer = content.strip()
        # A parser that saw no </think> returns everything as reasoning: a reply cut by the token
        # budget is still thinking; one that stopped by itself simply gave no separate answer.
        closed = bool(answer) or finish_reason != "length"
        inner = (
            split_reasoning(answer) if THINK_OPEN in answer.lower() or THINK_CLOSE in answer.lower() else None
        )
        if inner is not None and inner.reasoning is not None:
            return Reply(reasoning + "\n" + inner.reasoning, inner.answer, inner.closed)
        return Reply(reasoning, answer, closed)
    blocks = _THINK_BLOCK.findall(content)
    if blocks:
        rest = _THINK_BLOCK.sub("", content)
        low = rest.lower()
        if THINK_OPEN in low:  # a second thought opened and never closed
            start = low.index(THINK_OPEN)
            thought = "\n".join(b.strip() for b in blocks) + "\n" + rest[start + len(THINK_OPEN) :].strip()
            return Reply(thought, rest[:start].strip(), False)
        return Reply("\n".join(b.strip() for b in blocks), rest.strip())
    low = content.lower()
    if THINK_OPEN in low:
        start = low.index(THINK_OPEN)
        return Reply(content[start + len(THINK_OPEN) :].strip(), content[:start].strip(), False)
    if THINK_CLOSE in low:  # the template opened the thought in the prompt: only the close arrives
        end = low.rindex(THINK_CLOSE)
        return Reply(content[:end].strip(), content[end + len(THINK_CLOSE) :].strip())
    return Reply(None, content.strip())


def read_choice(choice: Any) -> Reply:
    """The :class:`Reply` of one chat-completions choice (SDK object or dict)."""
    message = _field(choice, "message")
    finish = _field(choice, "finish_reason")
    if message is None:
        return Reply(None, "")
    content = _field(message, "content")
    return split_reasoning(content if isinstance(content, str) else None, reasoning_field(message), finish)
