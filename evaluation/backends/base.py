"""What every evaluation backend shares: the sampling protocol, the reply record, the ``Backend``
protocol, and the ``<think>`` helpers (reasoning span, forced end of thinking).

A backend turns question rows into :class:`Generation` s for several seeds at once
(``generate(rows, seeds)``), with the protocol's sampling settings, and forces the end of
thinking when the budget runs out: a reply still inside ``<think>`` after ``max_new_tokens``
gets ``</think>`` plus an answer cue (:data:`FORCE_CUE`) appended and a short continuation
(``force_tokens``) generated, so an over-long reasoner is scored on an answer rather than on
nothing. ``Generation.text`` is the full reply (reasoning in ``<think>...</think>``, cue and
continuation included) and ``forced_end`` records that it was forced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from octomed_data.errors import OctomedError
from octomed_data.prompts import render_question, system_prompt

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Appended when the budget ran out mid-thought: close the thought, then open the answer box so
# that the short continuation is the answer itself (read by THE extraction module).
FORCE_CUE = "\n</think>\n\nFinal answer: \\boxed{"
THINK_PREFILL = "<think>\n"


class EndpointUnreachable(OctomedError):
    """The evaluation endpoint cannot be reached or refuses every request."""


@dataclass(frozen=True)
class SamplingProtocol:
    """The sampling protocol a backend applies (the paper's defaults live in EvalConfig)."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    force_end: bool = True
    force_tokens: int = 64
    prompting: str = "cot"
    prefill_think: bool = False


@dataclass
class Generation:
    """One reply: full text, token counts, how it ended, whether the end of thinking was forced."""

    text: str
    completion_tokens: int
    reasoning_tokens: int
    finish_reason: str  # stop | length | error
    forced_end: bool = False
    error: str | None = None


class Backend(Protocol):
    """What the harness needs from a model: replies for rows under several seeds."""

    name: str
    supports_images: bool

    def generate(self, rows: list[dict[str, Any]], seeds: list[int]) -> list[list[Generation]]:
        """``out[s][i]``: the reply to ``rows[i]`` sampled with ``seeds[s]``."""
        ...

    def describe(self) -> dict[str, Any]:
        """Secret-free facts about the backend for metrics.json (model, endpoint, dtype ...)."""
        ...

    def close(self) -> None: ...


def still_thinking(text: str) -> bool:
    """Whether ``text`` ends inside a thought: a ``<think>`` with no ``</think>`` after it."""
    low = text.lower()
    start = low.rfind(THINK_OPEN)
    return start >= 0 and low.find(THINK_CLOSE, start) < 0


def template_opens_think(tokenizer: Any) -> bool:
    """Whether the chat template opens the thought in the generation prompt (R1, Qwen3 templates):
    the reply then starts inside it although it carries no ``<think>`` of its own."""
    probe = [{"role": "user", "content": "x"}]
    with_gen = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
    return still_thinking(with_gen[len(without) :])


def chat_messages(row: Mapping[str, Any], prompting: str = "cot") -> list[dict[str, Any]]:
    """The teacher prompt for ``row`` as chat messages for a local model (image parts first)."""
    text = render_question(row)
    images = row.get("images") or []
    user: Any = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}] if images else text
    return [
        {"role": "system", "content": system_prompt(row["task_type"], prompting)},
        {"role": "user", "content": user},
    ]


def reasoning_span(response: str) -> tuple[str, bool]:
    """The text inside the first ``<think>...</think>`` (to the end if never closed), and whether it closed.

    A response without ``<think>`` has no reasoning span (empty, closed). A forced reply counts
    as closed only by the cue, which is not reasoning: the span stops at ``</think>``.
    """
    low = response.lower()
    start = low.find(THINK_OPEN)
    if start < 0:
        return "", True
    end = low.find(THINK_CLOSE, start)
    body = response[start + len(THINK_OPEN) : end if end >= 0 else len(response)]
    return body, end >= 0


def resolve_checkpoint(checkpoint_uri: str, cache_dir: Path) -> Path:
    """A local folder holding the model: a folder, a finished checkpoint URI or a HF model id
    (the one resolver training uses too: :func:`training.models.resolve_model`)."""
    from training.models import resolve_model

    return resolve_model(checkpoint_uri, cache_dir)
