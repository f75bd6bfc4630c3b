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

from octomed_data.sandbox.batch import BatchConfig
from octomed_data.sandbox.replies import (
    LLAMACPP_TOP_K_ERROR,
    SANDBOX_FINGERPRINT,
    SANDBOX_MARK,
    SANDBOX_TEACHER,
    answer_for,
    completion_payload,
    difficulty_score,
    prompt_text,
    request_key,
)
from octomed_data.sandbox.server import SandboxHandle, build_app, max_in_window, start_sandbox
from octomed_data.sandbox.state import FaultConfig, app_state

__all__ = [
    "answer_for",
    "prompt_text",
    "LLAMACPP_TOP_K_ERROR",
    "SANDBOX_FINGERPRINT",
    "SANDBOX_MARK",
    "SANDBOX_TEACHER",
    "BatchConfig",
    "FaultConfig",
    "SandboxHandle",
    "app_state",
    "build_app",
    "completion_payload",
    "difficulty_score",
    "max_in_window",
    "request_key",
    "start_sandbox",
]
