"""A loopback OpenAI-compatible chat-completions server: the sandbox teacher.

Used by the tests, the benchmark and the end-to-end demo. It is *not a model*: every reasoning
trace it returns starts with ``[sandbox teacher: not a model trace]``. It reads the options out
of the prompt and picks one deterministically from (prompt, seed), so pass rates look like
1/k, and states the answer in a rotating mix of the forms real teachers write. Its reasoning
arrives as ``reasoning_content`` (DeepSeek / vLLM) or inline ``<think>`` or a mix of both.

Fault injection (deterministic given ``FaultConfig.seed``): 429 with Retry-After, 500s,
dropped connections, slow replies, malformed JSON bodies, truncated completions
(``finish_reason=length``), refusals and 400 bad requests. Transient faults hit one request key (messages +
seed) at most ``max_faults_per_request`` times, so a client that retries gets through; truncation
and refusal are properties of the key and come back every time. An optional server-side
requests-per-window limit answers 429 and counts violations.

As a difficulty grader (a system prompt asking to "rate the difficulty ... from L to H", as
:mod:`octomed_data.distill.filtering` sends) it replies ``Difficulty: N`` with N derived from a
hash of the question text (:func:`difficulty_score`), or, for keys hit by the ``unparseable``
fault, a reply with no integer score.

With ``continuation_as_reasoning`` it answers a ``continue_final_message`` request as vLLM with
``--reasoning-parser deepseek_r1`` does: that parser calls any output without ``</think>``
reasoning, so the continuation (``B}`` after a forced ``</think> ... \\boxed{``) comes back as
``reasoning_content`` with no ``content``.

``server`` makes it answer as that kind of server does where kinds differ (see
:mod:`octomed_data.inference.servers`): ``vllm`` serves ``/version`` and honours ``n``;
``llamacpp`` lists its model as llama-cpp-python does (``owned_by: "me"``), ignores ``n`` and
answers ``top_k < 0`` with llama-cpp-python's HTTP 500 validation error; ``generic`` (default)
says nothing about itself. ``reasoning_field`` names the field separated reasoning arrives in:
``reasoning_content`` (DeepSeek, vLLM < 0.10) or ``reasoning`` (vLLM >= 0.10, SGLang).

As the verifier's judge (a system prompt carrying :data:`~octomed_data.prompts.JUDGE_SYSTEM_PROMPT`)
it reads the reference and the candidate answer from the prompt's last lines and replies
``VERDICT: CORRECT`` when the project's normalized match (:func:`octomed_data.verify.match.equivalent`)
calls them equivalent, else ``VERDICT: INCORRECT``; ``FaultConfig.judge_error`` flips that verdict for
a deterministic share of requests (per key), so a calibration against exact match measures something,
and ``unparseable`` keys get a reply with no verdict line.

``GET /_sandbox/stats`` returns the per-request log (arrival time, key, seed, status, fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from octomed_data.sandbox_batch import BATCH_STATE, BatchConfig, stats_of
from octomed_data.sandbox_batch import mount as mount_batch

SANDBOX_MARK = "[sandbox teacher: not a model trace]"
SANDBOX_FINGERPRINT = "octomed-sandbox"
SANDBOX_TEACHER = "sandbox"
Style = Literal["reasoning_content", "think", "mixed"]
ServerLike = Literal["generic", "vllm", "llamacpp"]
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


@dataclass
class FaultConfig:
    """Which faults to inject, as probabilities per request (transient) or per key (terminal)."""

    seed: int = 0
    rate_limited: float = 0.0  # 429 with Retry-After
    retry_after_s: float = 0.05
    server_error: float = 0.0  # 500
    dropped: float = 0.0  # connection closed without a reply
    slow: float = 0.0  # reply after an extra ``slow_s``
    slow_s: float = 2.0
    malformed: float = 0.0  # 200 with a body that is not JSON
    truncated: float = 0.0  # finish_reason=length, no final answer (per key)
    refusal: float = 0.0  # a refusal instead of an answer (per key)
    unparseable: float = 0.0  # grading replies with no integer score, judge replies with no verdict (per key)
    judge_error: float = 0.0  # the judge's verdict is flipped (per key)
    bad_request: float = 0.0  # 400 invalid_request_error, not retryable (per key)
    max_faults_per_request: int = 2
    rpm: int | None = None  # server-side limit per ``rpm_window_s``; excess -> 429 + violation
    rpm_window_s: float = 60.0
    honour_n: bool = False


@dataclass
class _State:
    latency_s: float
    faults: FaultConfig
    style: Style
    log_requests: bool
    log: list[dict[str, Any]] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    window: deque[float] = field(default_factory=deque)
    violations: int = 0
    requests: int = 0
    track_keys: bool = True
    completed: int = 0
    continuation_as_reasoning: bool = False
    server: ServerLike = "generic"
    reasoning_field: str = "reasoning_content"
    # Requests answered at once (a GPU server's batch slots); the rest queue. None: no cap.
    slots: asyncio.Semaphore | None = None
    active: dict[asyncio.Task[Any], web.Request] = field(default_factory=dict)  # for kill()


_STATE: web.AppKey[_State] = web.AppKey("sandbox_state", _State)


def app_state(app: web.Application) -> Any:
    """The chat endpoint's state of a sandbox app (what :func:`completion_payload` takes)."""
    return app[_STATE]


def _unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.blake2b("|".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _prompt_text(messages: list[dict[str, Any]]) -> str:
    chunks: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            chunks.append(content)
        elif isinstance(content, list):
            chunks.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "\n".join(chunks)


def _split_turns(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """(system text, text of every other turn)."""
    system = _prompt_text([m for m in messages if m.get("role") == "system"])
    return system, _prompt_text([m for m in messages if m.get("role") != "system"])


def difficulty_score(question_text: str, low: int = 1, high: int = 10) -> int:
    """The sandbox grader's score for a question: a hash of its user turn's text mapped to [low, high]."""
    return low + int(_unit("difficulty", question_text) * (high - low + 1))


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
    if style == "think" or (style == "mixed" and _unit("style", user, seed) < 0.5):
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
    if _unit("judge_error", f.seed, key) < f.judge_error:
        same = not same  # a judge that errs: deterministic per request key
    if unparseable:
        answer = "The candidate is close to the reference in some respects."
    else:
        reason = "means the same as" if same else "differs from"
        answer = f"The candidate {reason} the reference.\nVERDICT: {'CORRECT' if same else 'INCORRECT'}"
    message = {"role": "assistant", "content": answer}
    return message, "stop", max(1, len(answer) // 4)


def _answer_for(prompt: str, seed: int, choice: int) -> tuple[str, str, str]:
    """(label-or-answer, option text, kind) chosen from the options the prompt lists."""
    user = prompt.split("Question:", 1)[-1]
    options = _OPTION_LINE.findall(user)
    u = _unit("answer", prompt, seed, choice)
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
    label, text, kind = _answer_for(prompt, seed, choice)
    n_filler = 1 + int(_unit("len", prompt, seed, choice) * 12)
    reasoning = SANDBOX_MARK + " " + "".join(_FILLER[i % len(_FILLER)] for i in range(n_filler))
    if kind == "choice":
        fmt = _FORMATS[int(_unit("fmt", prompt, seed, choice) * len(_FORMATS))]
        answer = fmt.format(label=label, text=text)
    else:
        answer = f"Final answer: \\boxed{{{label}}}"
    use_think = style == "think" or (style == "mixed" and _unit("style", prompt, seed, choice) < 0.5)
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
    prefix = _prompt_text(messages[-1:])
    label, _, _ = _answer_for(_prompt_text(messages[:-1]), seed, 0)
    text = f"{label}}}" if prefix.rstrip().endswith("\\boxed{") else f"Final answer: \\boxed{{{label}}}"
    return {"role": "assistant", "content": text}, "stop", max(1, len(text) // 4)


def _kind(system: str) -> str:
    """What a request asks for, for the request log: judge, grade or sample."""
    from octomed_data.prompts import JUDGE_SYSTEM_PROMPT

    if JUDGE_SYSTEM_PROMPT in system:
        return "judge"
    return "grade" if _GRADING.search(system) else "sample"


def _transient_fault(state: _State, key: str, occurrence: int) -> str | None:
    f = state.faults
    if occurrence >= f.max_faults_per_request:
        return None
    u = _unit("fault", f.seed, key, occurrence)
    for name, p in (
        ("rate_limited", f.rate_limited),
        ("server_error", f.server_error),
        ("dropped", f.dropped),
        ("slow", f.slow),
        ("malformed", f.malformed),
    ):
        if u < p:
            return name
        u -= p
    return None


def _over_limit(state: _State, now: float) -> bool:
    f = state.faults
    if f.rpm is None:
        return False
    while state.window and now - state.window[0] >= f.rpm_window_s:
        state.window.popleft()
    state.window.append(now)
    return len(state.window) > f.rpm


async def _chat(request: web.Request) -> web.StreamResponse:
    state: _State = request.app[_STATE]
    task = asyncio.current_task()
    if task is not None:
        state.active[task] = request  # what kill() drops
    try:
        return await _answer(request, state)
    finally:
        state.active.pop(task, None)  # type: ignore[arg-type]


async def _answer(request: web.Request, state: _State) -> web.StreamResponse:
    arrived = time.time()
    state.requests += 1
    try:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise TypeError("no messages")
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": {"message": "invalid request body"}}, status=400)
    model = str(body.get("model", ""))
    seed = int(body.get("seed") or 0)
    n = int(body.get("n") or 1)
    if state.server == "llamacpp":
        n = 1  # llama.cpp ignores n
        if isinstance(body.get("top_k"), int) and body["top_k"] < 0:
            err = {"error": {"message": LLAMACPP_TOP_K_ERROR, "type": "internal_server_error"}}
            return web.json_response(err, status=500)
    key = request_key(body)
    occurrence = 0
    if state.track_keys:  # only transient faults need per-key history; a long benchmark stays flat
        occurrence = state.seen.get(key, 0)
        state.seen[key] = occurrence + 1
    over = _over_limit(state, time.monotonic())
    fault = "rpm_exceeded" if over else _transient_fault(state, key, occurrence)
    f = state.faults
    if fault is None and _unit("bad_request", f.seed, key) < f.bad_request:
        fault = "bad_request"
    if over:
        state.violations += 1
    system, _ = _split_turns(body["messages"])
    if state.log_requests:
        # The sampling fields as sent: shows whether a client switched the server's defaults off.
        fields = ("temperature", "top_p", "top_k", "repetition_penalty", "repeat_penalty")
        sampling = {k: body[k] for k in fields if k in body}
        state.log.append(
            {
                "t": arrived,
                "key": key,
                "seed": seed,
                "model": model,
                "n": n,
                "fault": fault,
                "sampling": sampling,
                "kind": _kind(system),
            }
        )
    async with state.slots or contextlib.nullcontext():
        if state.latency_s:
            await asyncio.sleep(state.latency_s)
    if fault in ("rate_limited", "rpm_exceeded"):
        headers = {
            "Retry-After": str(max(1, math.ceil(f.retry_after_s))),
            "retry-after-ms": str(int(f.retry_after_s * 1000)),
        }
        err = {"error": {"message": "rate limited (sandbox)", "type": "rate_limit_error"}}
        return web.json_response(err, status=429, headers=headers)
    if fault == "server_error":
        return web.json_response({"error": {"message": "internal error (sandbox)"}}, status=500)
    if fault == "bad_request":
        err = {"error": {"message": "bad request (sandbox)", "type": "invalid_request_error"}}
        return web.json_response(err, status=400)
    if fault == "dropped":
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError
    if fault == "slow":
        await asyncio.sleep(f.slow_s)
    if fault == "malformed":
        return web.Response(
            body=b'{"id": "chatcmpl-sandbox", "choices": [{"mess', content_type="application/json"
        )
    payload = completion_payload(state, body, key, arrived)
    state.completed += 1
    return web.json_response(payload)


def request_key(body: dict[str, Any]) -> str:
    """The sandbox's identity of a chat request (model, seed, prompt): what per-key faults hash."""
    ident = f"{body.get('model', '')}|{int(body.get('seed') or 0)}|{_prompt_text(body['messages'])}"
    return hashlib.blake2b(ident.encode(), digest_size=10).hexdigest()


def completion_payload(
    state: _State, body: dict[str, Any], key: str, arrived: float, *, honour_n: bool | None = None
) -> dict[str, Any]:
    """The chat-completion body for a request that got through (per-key truncation/refusal kept).

    Shared by the online endpoint and the batch endpoint (:mod:`octomed_data.sandbox_batch`).
    ``honour_n``: answer ``n`` choices (True) or one (False) whatever the server is set to do
    (None: as set; a batch server that ignores ``n`` passes False).
    """
    f = state.faults
    messages = body["messages"]
    system, user = _split_turns(messages)
    model = str(body.get("model", ""))
    seed = int(body.get("seed") or 0)
    n = 1 if state.server == "llamacpp" else int(body.get("n") or 1)
    prompt = _prompt_text(messages)
    truncated = _unit("truncated", f.seed, key) < f.truncated
    refusal = not truncated and _unit("refusal", f.seed, key) < f.refusal
    choices = []
    completion_tokens = 0
    unparseable = _unit("unparseable", f.seed, key) < f.unparseable
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


async def _models(request: web.Request) -> web.Response:
    state: _State = request.app[_STATE]
    owner = {"vllm": "vllm", "llamacpp": "me"}.get(state.server, SANDBOX_FINGERPRINT)
    return web.json_response(
        {"object": "list", "data": [{"id": "sandbox", "object": "model", "owned_by": owner}]}
    )


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": "0.32.0+sandbox"})


async def _stats(request: web.Request) -> web.Response:
    state: _State = request.app[_STATE]
    return web.json_response(_stats_of(state))


def _stats_of(state: _State) -> dict[str, Any]:
    return {
        "requests": state.requests,
        "completed": state.completed,
        "violations": state.violations,
        "log": list(state.log),
    }


def build_app(
    *,
    latency_s: float = 0.0,
    faults: FaultConfig | None = None,
    style: Style = "mixed",
    log_requests: bool = True,
    continuation_as_reasoning: bool = False,
    server: ServerLike = "generic",
    reasoning_field: str = "reasoning_content",
    batch: BatchConfig | None = None,
    max_concurrency: int | None = None,
) -> web.Application:
    """The aiohttp application (for embedding); :func:`start_sandbox` runs it in a thread.

    ``batch``: how its Files + Batch API (:mod:`octomed_data.sandbox_batch`) behaves.
    ``max_concurrency``: requests served at once (each taking ``latency_s``); more wait in a queue,
    as on a GPU server with that many batch slots.
    """
    if style not in ("reasoning_content", "think", "mixed"):
        raise ValueError(f"unknown style {style!r}")
    app = web.Application(client_max_size=64 * 1024 * 1024)
    f = faults or FaultConfig()
    transient = f.rate_limited + f.server_error + f.dropped + f.slow + f.malformed
    app[_STATE] = _State(
        latency_s,
        f,
        style,
        log_requests,
        track_keys=log_requests or transient > 0,
        continuation_as_reasoning=continuation_as_reasoning,
        server=server,
        reasoning_field=reasoning_field,
        slots=asyncio.Semaphore(max_concurrency) if max_concurrency else None,
    )
    if server not in ("generic", "vllm", "llamacpp"):
        raise ValueError(f"unknown server kind {server!r}")
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    if server == "vllm":
        app.router.add_get("/version", _version)
    app.router.add_get("/_sandbox/stats", _stats)
    mount_batch(app, batch or BatchConfig())
    return app


class SandboxHandle:
    """A running sandbox server in a background thread."""

    def __init__(self, app: web.Application, host: str) -> None:
        self._app = app
        self._host = host
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="sandbox-teacher", daemon=True)

    def _run(self, port: int = 0) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        except OSError as exc:
            self._error = exc
            self._ready.set()
            await runner.cleanup()
            return
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def start(self, port: int) -> SandboxHandle:
        self._requested_port = port
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise OSError(f"sandbox teacher could not listen on {self._host}:{port}: {self._error}")
        return self

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        """Counts and the per-request log (arrival ``t``, ``key``, ``seed``, ``fault``); also
        after :meth:`stop` / :meth:`kill` (then read from the stopped server's state)."""
        state: _State = self._app[_STATE]
        if not self._loop.is_running():
            return _stats_of(state)  # stopped: no other thread touches the state any more
        fut = asyncio.run_coroutine_threadsafe(_snapshot(state), self._loop)
        return fut.result(10)

    def batch_stats(self) -> dict[str, Any]:
        """The Batch API's counts (uploads, creations, retrievals, requests run) and batches."""
        bs = self._app[BATCH_STATE]
        return asyncio.run_coroutine_threadsafe(_call(stats_of, bs), self._loop).result(10)

    def batch_control(self, **changes: Any) -> None:
        """Change the batch behaviour while running (e.g. ``hold=False`` releases held batches)."""
        cfg = self._app[BATCH_STATE].config

        def apply(_: Any) -> None:
            for k, v in changes.items():
                if not hasattr(cfg, k):
                    raise ValueError(f"no batch setting {k!r}")
                setattr(cfg, k, v)

        asyncio.run_coroutine_threadsafe(_call(apply, None), self._loop).result(10)

    def stop(self) -> None:
        if self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kill(self) -> None:
        """Stop as a crashed server does: requests in flight get their connection reset, unanswered."""
        if self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._drop_all)
        self.stop()

    def _drop_all(self) -> None:
        state: _State = self._app[_STATE]
        for task, request in list(state.active.items()):
            if request.transport is not None:
                request.transport.abort()
            task.cancel()

    def __enter__(self) -> SandboxHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def _snapshot(state: _State) -> dict[str, Any]:
    return _stats_of(state)


async def _call(fn: Any, arg: Any) -> Any:
    return fn(arg)  # on the server's loop: no handler sees half a change


def start_sandbox(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    latency_s: float = 0.0,
    faults: FaultConfig | None = None,
    style: Style = "mixed",
    log_requests: bool = True,
    continuation_as_reasoning: bool = False,
    server: ServerLike = "generic",
    reasoning_field: str = "reasoning_content",
    batch: BatchConfig | None = None,
    max_concurrency: int | None = None,
) -> SandboxHandle:
    """Start the sandbox teacher in a background thread; ``port=0`` picks a free port.

    ``continuation_as_reasoning``: answer message continuations as vLLM's deepseek_r1 reasoning
    parser does (the new text in ``reasoning_content``). ``max_concurrency``: requests served at
    once, the rest queue (a GPU server's batch slots).
    """
    app = build_app(
        latency_s=latency_s,
        faults=faults,
        style=style,
        log_requests=log_requests,
        continuation_as_reasoning=continuation_as_reasoning,
        server=server,
        reasoning_field=reasoning_field,
        batch=batch,
        max_concurrency=max_concurrency,
    )
    return SandboxHandle(app, host).start(port)


def max_in_window(times: list[float], window_s: float) -> int:
    """The most arrivals in any half-open window of ``window_s`` seconds (two pointers)."""
    ts = sorted(times)
    best = 0
    lo = 0
    for hi, t in enumerate(ts):
        while t - ts[lo] >= window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
