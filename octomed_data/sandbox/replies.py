"""What the sandbox says: sampled answers, grades, verdicts and continuations (not a model)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from octomed_data.sandbox.state import FaultConfig, State, Style, unit
from octomed_data.teachers import SIMULATED_FINGERPRINT, SIMULATED_LABEL

SANDBOX_MARK = "[sandbox teacher: not a model trace]"
SANDBOX_FINGERPRINT = SIMULATED_FINGERPRINT  # the sandbox is the factory's simulated teacher
SANDBOX_TEACHER = SIMULATED_LABEL
# llama-cpp-python 0.3's answer to top_k=-1 (its pydantic request model wants top_k >= 0).
LLAMACPP_TOP_K_ERROR = (
    "1 validation error:\n  {'type': 'greater_than_equal', 'loc': ('body', 'top_k'), "
    "'msg': 'Input should be greater than or equal to 0', 'input': -1, 'ctx': {'ge': 0}}"
)

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$", re.MULTILINE)
_FORMATS = (
    "Final answer: \\boxed{{{label}}}",
    "The answer is ({label}).",
    "Answer: {label}",
    "<answer>{label}</answer>",
    "After weighing the options, I choose:\n\n**{label}**",
    "{label}. {text}",
    "The correct answer is {text}.",
    "**Answer: {label}** - the other options fit the findings less well.",
)
# A grading request: the system turn asks for a difficulty rating on an integer scale.
_GRADING = re.compile(r"rate the difficulty\b.*?\bfrom (\d+) to (\d+)", re.IGNORECASE | re.DOTALL)
_FILLER = (
    "The key findings in the stem point toward a specific mechanism. ",
    "Each option is weighed against the presentation and the timeline. ",
    "Distractors that explain only part of the picture are discarded. ",
    "The most consistent explanation is kept and re-checked against the stem. ",
)


def prompt_text(messages: list[dict[str, Any]]) -> str:
    chunks: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            chunks.append(content)
        elif isinstance(content, list):
            chunks.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "\n".join(chunks)


def split_turns(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """(system text, text of every other turn)."""
    system = prompt_text([m for m in messages if m.get("role") == "system"])
    return system, prompt_text([m for m in messages if m.get("role") != "system"])


def difficulty_score(question_text: str, low: int = 1, high: int = 10) -> int:
    """The sandbox grader's score for a question: a hash of its user turn's text mapped to [low, high]."""
    return low + int(unit("difficulty", question_text) * (high - low + 1))


def _grading(system: str, user: str, seed: int, style: Style, unparseable: bool, truncated: bool):
    """A grading reply (message dict, finish_reason, completion_tokens), or None for other prompts."""
    m = _GRADING.search(system)
    if m is None:
        return None
    low, high = int(m.group(1)), int(m.group(2))
    score = difficulty_score(user, low, high)
    reasoning = SANDBOX_MARK + " " + _FILLER[score % len(_FILLER)]
    if unparseable:
        answer = "Reason: it depends on the reader's background.\nDifficulty: moderate"
    else:
        answer = f"Reason: the stem needs about {score} inferential steps.\nDifficulty: {score}"
    finish = "stop"
    if truncated:
        finish, answer = "length", ""
    message: dict[str, Any] = {"role": "assistant"}
    if style == "think" or (style == "mixed" and unit("style", user, seed) < 0.5):
        message["content"] = f"<think>{reasoning}" + ("" if truncated else f"</think>\n\n{answer}")
    else:
        message["content"] = answer
        message["reasoning_content"] = reasoning
    return message, finish, max(1, (len(reasoning) + len(answer)) // 4)


def _judging(system: str, user: str, key: str, f: FaultConfig, unparseable: bool):
    """A judge reply (message dict, finish_reason, completion_tokens), or None for other prompts."""
    from octomed_data.prompts import JUDGE_CANDIDATE, JUDGE_REFERENCE, JUDGE_SYSTEM_PROMPT

    if JUDGE_SYSTEM_PROMPT not in system or JUDGE_CANDIDATE not in user:
        return None
    from octomed_data.verify.match import equivalent

    head, candidate = user.rsplit(JUDGE_CANDIDATE, 1)
    reference = head.rsplit(JUDGE_REFERENCE, 1)[-1]
    same = equivalent(reference.strip(), candidate.strip()) is not None
    if unit("judge_error", f.seed, key) < f.judge_error:
        same = not same  # a judge that errs: deterministic per request key
    if unparseable:
        answer = "The candidate is close to the reference in some respects."
    else:
        reason = "means the same as" if same else "differs from"
        answer = f"The candidate {reason} the reference.\nVERDICT: {'CORRECT' if same else 'INCORRECT'}"
    message = {"role": "assistant", "content": answer}
    return message, "stop", max(1, len(answer) // 4)


def answer_for(prompt: str, seed: int, choice: int) -> tuple[str, str, str]:
    """(label-or-answer, option text, kind) chosen from the options the prompt lists."""
    user = prompt.split("Question:", 1)[-1]
    options = _OPTION_LINE.findall(user)
    u = unit("answer", prompt, seed, choice)
    if options:
        label, text = options[int(u * len(options))]
        return label, text, "choice"
    if "yes, no or maybe" in prompt:
        word = ("yes", "no", "maybe")[int(u * 3)]
        return word, word, "verdict"
    words = [w.strip(".,?;:()").lower() for w in user.split() if len(w) > 3]
    word = words[int(u * len(words))] if words else "unknown"
    return word, word, "open"


def _completion(prompt: str, seed: int, choice: int, style: Style, truncated: bool, refusal: bool):
    """One choice: (message dict, finish_reason, completion_tokens)."""
    label, text, kind = answer_for(prompt, seed, choice)
    n_filler = 1 + int(unit("len", prompt, seed, choice) * 12)
    reasoning = SANDBOX_MARK + " " + "".join(_FILLER[i % len(_FILLER)] for i in range(n_filler))
    if kind == "choice":
        fmt = _FORMATS[int(unit("fmt", prompt, seed, choice) * len(_FORMATS))]
        answer = fmt.format(label=label, text=text)
    else:
        answer = f"Final answer: \\boxed{{{label}}}"
    use_think = style == "think" or (style == "mixed" and unit("style", prompt, seed, choice) < 0.5)
    message: dict[str, Any] = {"role": "assistant"}
    finish = "stop"
    if refusal:
        message.update(content="I'm sorry, but I can't help with that request.", refusal="declined")
        return message, finish, 12
    if truncated:
        reasoning = reasoning[: max(len(SANDBOX_MARK) + 10, len(reasoning) // 2)]
        finish = "length"
        answer = ""
    if use_think:
        closing = "" if truncated else "</think>\n\n"
        message["content"] = f"<think>{reasoning}{closing}{answer}"
    else:
        message["content"] = answer
        message["reasoning_content"] = reasoning
    return message, finish, max(1, (len(reasoning) + len(answer)) // 4)


def _cut_to_budget(message: dict[str, Any], max_tokens: int) -> tuple[dict[str, Any], str, int]:
    """The reply a server gives when ``max_tokens`` runs out mid-reasoning (about 4 chars a token).

    Sandbox reasoning is a few hundred tokens, so a small budget always ends inside the reasoning:
    no ``</think>``, no answer, ``finish_reason=length``, as a real reasoning model would stop.
    """
    keep = max_tokens * 4
    cut: dict[str, Any] = {"role": "assistant"}
    if "reasoning_content" in message:
        cut.update(content="", reasoning_content=message["reasoning_content"][:keep])
    else:
        content = message.get("content") or ""
        start = content.find("<think>")
        body = content[start + len("<think>") :] if start >= 0 else content
        cut["content"] = ("<think>" if start >= 0 else "") + body[:keep].replace("</think>", "")
    return cut, "length", max_tokens


def _continuation(messages: list[dict[str, Any]], body: dict[str, Any], seed: int):
    """A reply continuing a final assistant message (vLLM's ``continue_final_message``), or None.

    Evaluation forces the end of thinking by sending the truncated reasoning + ``</think>`` + an
    answer cue as a partial assistant turn; the continuation is only the new text: the answer
    (closing ``\\boxed{`` when the cue opened it), chosen from the options as any reply would be.
    """
    if not body.get("continue_final_message") or not messages or messages[-1].get("role") != "assistant":
        return None
    prefix = prompt_text(messages[-1:])
    label, _, _ = answer_for(prompt_text(messages[:-1]), seed, 0)
    text = f"{label}}}" if prefix.rstrip().endswith("\\boxed{") else f"Final answer: \\boxed{{{label}}}"
    return {"role": "assistant", "content": text}, "stop", max(1, len(text) // 4)


def request_kind(system: str) -> str:
    """What a request asks for, for the request log: judge, grade or sample."""
    from octomed_data.prompts import JUDGE_SYSTEM_PROMPT

    if JUDGE_SYSTEM_PROMPT in system:
        return "judge"
    return "grade" if _GRADING.search(system) else "sample"


def request_key(body: dict[str, Any]) -> str:
    """The sandbox's identity of a chat request (model, seed, prompt): what per-key faults hash."""
    ident = f"{body.get('model', '')}|{int(body.get('seed') or 0)}|{prompt_text(body['messages'])}"
    return hashlib.blake2b(ident.encode(), digest_size=10).hexdigest()


def completion_payload(
    state: State, body: dict[str, Any], key: str, arrived: float, *, honour_n: bool | None = None
) -> dict[str, Any]:
    """The chat-completion body for a request that got through (per-key truncation/refusal kept).

    Shared by the online endpoint and the batch endpoint (:mod:`octomed_data.sandbox_batch`).
    ``honour_n``: answer ``n`` choices (True) or one (False) whatever the server is set to do
    (None: as set; a batch server that ignores ``n`` passes False).
    """
    f = state.faults
    messages = body["messages"]
    system, user = split_turns(messages)
    model = str(body.get("model", ""))
    seed = int(body.get("seed") or 0)
    n = 1 if state.server == "llamacpp" else int(body.get("n") or 1)
    prompt = prompt_text(messages)
    truncated = unit("truncated", f.seed, key) < f.truncated
    refusal = not truncated and unit("refusal", f.seed, key) < f.refusal
    choices = []
    completion_tokens = 0
    unparseable = unit("unparseable", f.seed, key) < f.unparseable
    continuation = _continuation(messages, body, seed)
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if honour_n is None:
        honour_n = f.honour_n or state.server == "vllm"
    for i in range(n if honour_n else 1):
        graded = None if refusal else _grading(system, user, seed, state.style, unparseable, truncated)
        judged = None if refusal else _judging(system, user, key, f, unparseable)
        if continuation is not None:
            message, finish, tokens = continuation
            if state.continuation_as_reasoning:
                message = {"role": "assistant", "content": None, "reasoning_content": message["content"]}
        elif graded is not None:
            message, finish, tokens = graded
        elif judged is not None:
            message, finish, tokens = judged
        else:
            message, finish, tokens = _completion(prompt, seed, i, state.style, truncated, refusal)
            if isinstance(max_tokens, int) and 0 < max_tokens < tokens:
                message, finish, tokens = _cut_to_budget(message, max_tokens)
        if state.reasoning_field != "reasoning_content" and "reasoning_content" in message:
            message = dict(message)
            message[state.reasoning_field] = message.pop("reasoning_content")
        choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": None})
        completion_tokens += tokens
    payload = {
        "id": f"chatcmpl-{key}",
        "object": "chat.completion",
        "created": int(arrived),
        "model": model,
        # Lets the engine label every sample from here teacher="sandbox", whatever the config says.
        "system_fingerprint": SANDBOX_FINGERPRINT,
        "choices": choices,
        "usage": {
            "prompt_tokens": max(1, len(prompt) // 4),
            "completion_tokens": completion_tokens,
            "total_tokens": max(1, len(prompt) // 4) + completion_tokens,
        },
    }
    return payload
