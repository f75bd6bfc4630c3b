"""The sandbox server's state: which faults to inject, and what it has seen."""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

Style = Literal["reasoning_content", "think", "mixed"]
ServerLike = Literal["generic", "vllm", "llamacpp"]


def unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.blake2b("|".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


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
class State:
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


STATE: web.AppKey[State] = web.AppKey("sandbox_state", State)


def app_state(app: web.Application) -> Any:
    """The chat endpoint's state of a sandbox app (what :func:`completion_payload` takes)."""
    return app[STATE]


def transient_fault(state: State, key: str, occurrence: int) -> str | None:
    f = state.faults
    if occurrence >= f.max_faults_per_request:
        return None
    u = unit("fault", f.seed, key, occurrence)
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


def over_limit(state: State, now: float) -> bool:
    f = state.faults
    if f.rpm is None:
        return False
    while state.window and now - state.window[0] >= f.rpm_window_s:
        state.window.popleft()
    state.window.append(now)
    return len(state.window) > f.rpm


def server_stats(state: State) -> dict[str, Any]:
    return {
        "requests": state.requests,
        "completed": state.completed,
        "violations": state.violations,
        "log": list(state.log),
    }
