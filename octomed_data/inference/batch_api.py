"""The OpenAI Files + Batch API: upload a JSONL of requests, submit it, poll it, read its results.

The subset batch mode (:mod:`octomed_data.distill.batch`) uses, on the same conventions as the
chat path: one aiohttp pool per client with the teacher's bearer key, every call retried with
:class:`~octomed_data.inference.retry.Backoff` (Retry-After honoured), failures classified by
:func:`~octomed_data.inference.client.classify` (4xx other than 408/409/425/429 are not
retried), and error text scrubbed of the key and kept to one line.

Files are moved through local temporary files, never whole in memory: an upload streams its
file from disk, and :meth:`BatchAPI.lines` downloads an output file to disk (retried whole on a
cut connection) before yielding it line by line.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from octomed_data.errors import OctomedError
from octomed_data.inference.client import TeacherUnreachable
from octomed_data.inference.retry import Backoff
from octomed_data.inference.transport_http import error_message
from octomed_data.inference.wire import HTTPStatusError, classify, scrub

# Batch statuses after which nothing changes any more.
TERMINAL = frozenset({"completed", "expired", "failed", "cancelled"})
CHAT_ENDPOINT = "/v1/chat/completions"
_CHUNK = 1 << 20


class BatchAPIError(OctomedError):
    """A Files/Batch API call failed for good (a 4xx, or every attempt failed)."""


class BatchAPI:
    """One endpoint's Files + Batch API (``base_url`` ends in ``/v1``, as the teacher's does)."""

    def __init__(
        self,
        base_url: str,
        key: SecretStr,
        *,
        timeout_s: float = 600.0,
        max_attempts: int = 6,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.base = base_url.rstrip("/")
        self._key = key
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self.sleep = sleep
        self.session: aiohttp.ClientSession | None = None
        self.calls = 0  # HTTP calls made (attempts)

    def _open(self) -> aiohttp.ClientSession:
        # Opened inside the running loop on first use (a session belongs to one loop).
        if self.session is None or self.session.closed:
            headers = {"Authorization": f"Bearer {self._key.get_secret_value()}"}
            self.session = aiohttp.ClientSession(timeout=self.timeout, headers=headers)
        return self.session

    async def _call(self, what: str, method: str, path: str, **kwargs: Any) -> Any:
        """One API call with retries; ``kwargs`` may hold ``json``, ``params`` or ``form`` (a
        callable building fresh form data per attempt, whose files it opens), ``sink`` (a
        callable writing the body to disk) or ``before_retry`` (awaited before each retry: what
        it returns, when not None, is the call's result)."""
        form = kwargs.pop("form", None)
        sink = kwargs.pop("sink", None)
        before_retry = kwargs.pop("before_retry", None)
        last = ""
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1 and before_retry is not None:
                done = await before_retry()
                if done is not None:
                    return done
            self.calls += 1
            opened: list[Any] = []
            try:
                if form is not None:
                    kwargs["data"] = form(opened)
                async with self._open().request(method, self.base + path, **kwargs) as resp:
                    if resp.status >= 400:
                        raise HTTPStatusError(resp.status, error_message(await resp.read()), resp.headers)
                    if sink is not None:
                        return await sink(resp)
                    return orjson.loads(await resp.read())
            except Exception as exc:  # classified like every chat request
                failure = classify(exc)
                last = scrub(str(failure), [self._key.get_secret_value()])
                if not failure.retryable or attempt == self.max_attempts:
                    cls = TeacherUnreachable if failure.outage else BatchAPIError
                    raise cls(f"{what} at {self.base} failed after {attempt} attempt(s): {last}") from None
                await self.sleep(self.backoff(attempt, failure.delay))
            finally:
                for fh in opened:
                    fh.close()
        raise BatchAPIError(f"{what} at {self.base} failed: {last}")  # pragma: no cover (loop returns)

    async def upload(self, path: str, filename: str = "requests.jsonl") -> dict[str, Any]:
        """Upload a local JSONL file with ``purpose=batch``; returns the file object."""

        def form(opened: list[Any]) -> aiohttp.FormData:
            fh = open(path, "rb")  # noqa: SIM115 (closed by _call after the attempt)
            opened.append(fh)
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            data.add_field("file", fh, filename=filename, content_type="application/jsonl")
            return data

        return await self._call("file upload", "POST", "/files", form=form)

    async def create(
        self, input_file_id: str, completion_window: str = "24h", metadata: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Submit a batch of chat completions over an uploaded file; returns the batch object.

        A create that failed may still have created the batch (the answer was lost, or a 5xx
        came after the work): before every retry the batch is looked up by its input file, and
        adopted when it exists, so one file never becomes two paid batches.
        """
        body = {
            "input_file_id": input_file_id,
            "endpoint": CHAT_ENDPOINT,
            "completion_window": completion_window,
            "metadata": metadata or {},
        }

        async def created() -> dict[str, Any] | None:
            return await self.find(input_file_id)

        return await self._call("batch create", "POST", "/batches", json=body, before_retry=created)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        """The batch object now (status, request_counts, output/error file ids)."""
        return await self._call("batch retrieve", "GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._call("batch cancel", "POST", f"/batches/{batch_id}/cancel")

    async def find(self, input_file_id: str, page: int = 100, max_pages: int = 50) -> dict[str, Any] | None:
        """The batch created over ``input_file_id``, if any (newest first, ``max_pages`` pages).

        Finds a batch whose create call was sent but whose answer never came back (a crash in
        between): it must be adopted, not submitted again.
        """
        after: str | None = None
        for _ in range(max_pages):
            params = {"limit": str(page)} | ({"after": after} if after else {})
            listing = await self._call("batch list", "GET", "/batches", params=params)
            for batch in listing.get("data") or []:
                if batch.get("input_file_id") == input_file_id:
                    return batch
            if not listing.get("has_more") or not listing.get("data"):
                return None
            after = listing["data"][-1]["id"]
        return None

    async def lines(self, file_id: str) -> AsyncIterator[bytes]:
        """The lines of a file's content (output or error JSONL), via a local temporary file."""
        fd, tmp = tempfile.mkstemp(prefix="octomed-batch-", suffix=".jsonl")
        os.close(fd)

        async def sink(resp: aiohttp.ClientResponse) -> None:
            with open(tmp, "wb") as fh:  # a retried download starts the file again
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    fh.write(chunk)

        try:
            await self._call("file content", "GET", f"/files/{file_id}/content", sink=sink)
            with open(tmp, "rb") as fh:
                for line in fh:
                    if line.strip():
                        yield line
        finally:
            os.unlink(tmp)

    async def close(self) -> None:
        if self.session is not None and not self.session.closed:
            await self.session.close()
            await asyncio.sleep(0)
