"""The wire's vocabulary: what a transport is, and what a failed request means.

:class:`Transport` is how requests reach an endpoint (the lean HTTP transport, the OpenAI SDK, a
fleet of replicas); :func:`classify` maps any transport's exception to a
:class:`~octomed_data.inference.retry.Failure` (retryable or not, connection-level or not,
Retry-After); :func:`scrub` takes keys out of every error before it is stored or logged.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from typing import Any, Protocol

import aiohttp
import openai

from octomed_data.inference.retry import Failure, parse_retry_after
from octomed_data.release_safety import scrub_secrets

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
# Key-shaped: a key prefix, then a long run holding a digit ("sk-proj-3f9...", "api_0123..."); prose
# such as "key-shaped" or "api_key_env" is not.
_KEYLIKE = re.compile(r"\b(?:sk|key|api)[-_](?=[A-Za-z_\-*]*\d)[A-Za-z0-9_\-*]{10,}", re.IGNORECASE)
# A server's error is kept whole (the cause is often on its last line), on one line, bounded.
MAX_ERROR_CHARS = 600


class HTTPStatusError(Exception):
    """The server answered with an HTTP error status (its message and headers kept)."""

    def __init__(self, status: int, message: str, headers: Any) -> None:
        super().__init__(f"Error code: {status} - {message}")
        self.status_code = status
        self.message = message
        self.headers = headers


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Remove keys (and anything key-shaped) from an error message before it is stored or logged.

    A key is replaced where it stands as a token of its own, never inside a longer word: a short
    placeholder key must not turn ``max_tokens`` into ``ma***_tokens``. Keys of 8+ characters are
    also replaced in every other spelling (:func:`~octomed_data.release_safety.scrub_secrets`).
    """
    secrets = [s for s in secrets if s]
    for s in secrets:
        text = re.sub(rf"(?<![A-Za-z0-9_\-]){re.escape(s)}(?![A-Za-z0-9_\-])", "***", text)
    text = scrub_secrets(text, secrets)  # URL-encoded, JSON-escaped and base64 spellings too
    return _KEYLIKE.sub("***", text)


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Collapse a (server's) message to one line of at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def retry_after(exc: BaseException) -> float | None:
    """The Retry-After an HTTP error's response carries, in seconds (None when there is none)."""
    response = getattr(exc, "response", None)
    return None if response is None else parse_retry_after(response.headers)


def connection_mode(exc: BaseException) -> str:
    """How a connection-level failure looks, in a few words (the outage line's failure mode)."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "reply cut short"
    seen: BaseException | None = exc
    for _ in range(6):  # the cause chain: SDK error -> httpx error -> OSError
        if seen is None:
            break
        inner = getattr(seen, "os_error", None)  # aiohttp's ClientConnectorError
        for e in (seen, inner):
            code = getattr(e, "errno", None)
            if isinstance(e, ConnectionRefusedError) or code == errno.ECONNREFUSED:
                return "connection refused"
            if isinstance(e, ConnectionResetError) or code == errno.ECONNRESET:
                return "connection reset"
        if isinstance(seen, TimeoutError):
            return "connect timed out" if isinstance(seen, aiohttp.ConnectionTimeoutError) else "timed out"
        seen = seen.__cause__ or seen.__context__
    return "connection error"


def classify(exc: BaseException) -> Failure:
    """Map a transport's (SDK, aiohttp or local) exception to a :class:`Failure`.

    Auth / bad request: not retryable. Both transports map the same event to the same failure:
    429 (Retry-After kept), other 4xx/5xx with the server's message on one line, a timeout, a
    refused/dropped connection or a body cut short (connection-level: the breaker counts them),
    a body that is not a chat completion (malformed: retried, not an outage).
    """
    if isinstance(exc, HTTPStatusError):
        code = exc.status_code
        delay = parse_retry_after(exc.headers)
        if code == 429:
            return Failure("rate limited (429)", True, delay)
        retryable = code in RETRYABLE_STATUS or code >= 500
        message = f"HTTP {code}: {one_line(exc.message)}"
        return Failure(message, retryable, delay, outage=code >= 500, mode=f"HTTP {code}")
    if isinstance(exc, TimeoutError):  # before aiohttp's: its ServerTimeoutError is both
        return Failure("request timed out", True, outage=True, mode=connection_mode(exc))
    if isinstance(
        exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError)
    ):
        message = f"connection error ({type(exc).__name__})"
        return Failure(message, True, outage=True, mode=connection_mode(exc))
    if isinstance(exc, openai.RateLimitError):
        return Failure("rate limited (429)", True, retry_after(exc))
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        retryable = code in RETRYABLE_STATUS or code >= 500
        message = f"HTTP {code}: {one_line(str(exc))}"
        return Failure(message, retryable, retry_after(exc), outage=code >= 500, mode=f"HTTP {code}")
    if isinstance(exc, openai.APITimeoutError):
        return Failure("request timed out", True, outage=True, mode="timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f" ({type(cause).__name__})" if cause is not None else ""
        return Failure(f"connection error{detail}", True, outage=True, mode=connection_mode(exc))
    if isinstance(exc, (ValueError, openai.APIResponseValidationError, KeyError, TypeError, AttributeError)):
        return Failure(f"malformed response: {type(exc).__name__}", True)
    return Failure(f"{type(exc).__name__}: {one_line(str(exc), 300)}", True)


class Transport(Protocol):
    """How requests reach an endpoint: send one chat completion, classify its errors, close."""

    async def chat(self, **kwargs: Any) -> Any:
        """One chat-completions request (OpenAI request fields); returns the response object."""

    def classify(self, exc: BaseException) -> Failure:
        """What a failed :meth:`chat` means: retryable or not, connection-level or not."""

    async def close(self) -> None: ...
