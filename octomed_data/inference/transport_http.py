"""The lean HTTP transport: chat completions over one aiohttp connection pool, no SDK objects.

Why not the OpenAI SDK on the hot path: measured side by side on a loopback teacher, the SDK's
per-request cost (httpx request building, pydantic response models, header/retry bookkeeping)
made a bare ``AsyncOpenAI`` loop 2.9-4.4x slower per sample than curator's aiohttp client. This
transport sends the same request body (``extra_body`` merged into the top level, as the SDK
does), parses the reply with orjson, and hands back :class:`Fields`: the decoded JSON read by
attribute, which is all :mod:`~octomed_data.inference.replies` and the callers read
(``choices[i].message.content/reasoning/reasoning_content/refusal``, ``finish_reason``,
``usage``, ``system_fingerprint``).

Failures become the same :class:`~octomed_data.inference.retry.Failure` classes as the SDK's (see
:func:`octomed_data.inference.client.classify`): HTTP 4xx/5xx (:class:`HTTPStatusError`, with the
server's message and Retry-After), a dropped connection or a body cut short (connection-level,
counted by the breaker), a body that is not a chat completion (malformed, retried).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from octomed_data.inference.retry import Failure
from octomed_data.inference.wire import HTTPStatusError, classify

# Connections beyond the in-flight bound: room for health probes (GET /models) when every request
# slot holds a long generation.
PROBE_CONNECTIONS = 2

__all__ = [
    "Fields",
    "HTTPStatusError",
    "HTTPTransport",
    "completion_fields",
    "error_message",
    "parse_completion",
]


class Fields:
    """A decoded JSON object read by attribute; a missing field reads as None.

    Nested objects are wrapped when read, lists of objects likewise; nothing is validated or
    copied, so a reply costs one ``orjson.loads``.
    """

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = self.data.get(name)
        if type(value) is dict:
            return Fields(value)
        if type(value) is list:
            return [Fields(v) if type(v) is dict else v for v in value]
        return value

    def __repr__(self) -> str:
        return f"Fields({self.data!r})"


def error_message(body: bytes) -> str:
    """The server's error message from an error body (``{"error": {"message": ...}}`` or text)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(data)


def parse_completion(body: bytes) -> Fields:
    """A chat-completions body as :class:`Fields` (``ValueError`` when it is not one)."""
    # orjson.JSONDecodeError is a ValueError: "malformed response"
    return completion_fields(orjson.loads(body))


def completion_fields(data: Any) -> Fields:
    """A decoded chat-completions object as :class:`Fields` (``ValueError`` when it is not one);
    also reads the ``response.body`` of a Batch API output line."""
    if not isinstance(data, dict):
        raise ValueError("response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not all(
        isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices
    ):
        raise ValueError("response choices are not chat messages")
    usage = data.get("usage")
    if usage is not None and not (
        isinstance(usage, dict)
        and isinstance(usage.get("prompt_tokens"), int)
        and isinstance(usage.get("completion_tokens"), int)
    ):
        data["usage"] = None  # unusable counts: treated as absent (the estimate stands)
    return Fields(data)


class HTTPTransport:
    """Chat completions over aiohttp: one connection pool per client, opened on first use.

    The pool is created lazily inside the running event loop (clients are built in a worker
    thread, and a session belongs to one loop). ``timeout_s`` bounds each request end to end
    (:func:`~octomed_data.inference.client.request_with_retries` bounds it too, whatever the
    transport); the pool keeps up to ``max_connections`` connections alive to the endpoint, plus
    :data:`PROBE_CONNECTIONS` so a health probe (:meth:`probe`) never waits behind requests in
    flight. A connection that does not open in ``connect_timeout_s`` fails (a host that is gone
    drops the SYN: without this it would take the whole ``timeout_s`` to notice).
    """

    def __init__(
        self,
        base_url: str,
        key: SecretStr,
        timeout_s: float,
        max_connections: int = 256,
        connect_timeout_s: float | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.models_url = base_url.rstrip("/") + "/models"
        self.headers = {
            "Authorization": f"Bearer {key.get_secret_value()}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        connect = min(connect_timeout_s, timeout_s) if connect_timeout_s else None
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect)
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None

    def open(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections + PROBE_CONNECTIONS, limit_per_host=0, ttl_dns_cache=300
            )
            self.session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                headers=self.headers,
                skip_auto_headers=("User-Agent",),
            )
        return self.session

    async def chat(self, **kwargs: Any) -> Fields:
        extra = kwargs.pop("extra_body", None)
        if extra:
            kwargs.update(extra)  # as the SDK sends extra_body: merged into the request body
        body = orjson.dumps(kwargs)
        async with self.open().post(self.url, data=body) as resp:
            data = await resp.read()  # a body cut short raises ClientPayloadError
            if resp.status >= 400:
                raise HTTPStatusError(resp.status, error_message(data), resp.headers)
        return parse_completion(data)

    async def probe(self) -> None:
        """A cheap request (``GET /models``) a fleet sends to an ejected replica; raises unless it
        answers below 500 (an auth or routing error still means the server is up)."""
        async with self.open().get(self.models_url) as resp:
            data = await resp.read()
            if resp.status >= 500:
                raise HTTPStatusError(resp.status, error_message(data), resp.headers)

    def classify(self, exc: BaseException) -> Failure:
        return classify(exc)

    async def close(self) -> None:
        if self.session is not None and not self.session.closed:
            await self.session.close()
            await asyncio.sleep(0)  # let the connector close its transports before the loop ends
