"""The sandbox's HTTP server: the chat endpoint with its faults, a thread to run it in."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from typing import Any

from aiohttp import web

from octomed_data.sandbox.batch import BATCH_STATE, BatchConfig, stats_of
from octomed_data.sandbox.batch import mount as mount_batch
from octomed_data.sandbox.replies import (
    LLAMACPP_TOP_K_ERROR,
    SANDBOX_FINGERPRINT,
    completion_payload,
    request_key,
    request_kind,
    split_turns,
    unit,
)
from octomed_data.sandbox.state import (
    STATE,
    FaultConfig,
    ServerLike,
    State,
    Style,
    over_limit,
    server_stats,
    transient_fault,
)


async def _chat(request: web.Request) -> web.StreamResponse:
    state: State = request.app[STATE]
    task = asyncio.current_task()
    if task is not None:
        state.active[task] = request  # what kill() drops
    try:
        return await _answer(request, state)
    finally:
        state.active.pop(task, None)  # type: ignore[arg-type]


async def _answer(request: web.Request, state: State) -> web.StreamResponse:
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
    over = over_limit(state, time.monotonic())
    fault = "rpm_exceeded" if over else transient_fault(state, key, occurrence)
    f = state.faults
    if fault is None and unit("bad_request", f.seed, key) < f.bad_request:
        fault = "bad_request"
    if over:
        state.violations += 1
    system, _ = split_turns(body["messages"])
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
                "kind": request_kind(system),
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


async def _models(request: web.Request) -> web.Response:
    state: State = request.app[STATE]
    owner = {"vllm": "vllm", "llamacpp": "me"}.get(state.server, SANDBOX_FINGERPRINT)
    return web.json_response(
        {"object": "list", "data": [{"id": "sandbox", "object": "model", "owned_by": owner}]}
    )


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": "0.32.0+sandbox"})


async def _stats(request: web.Request) -> web.Response:
    state: State = request.app[STATE]
    return web.json_response(server_stats(state))


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
    app[STATE] = State(
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
        state: State = self._app[STATE]
        if not self._loop.is_running():
            return server_stats(state)  # stopped: no other thread touches the state any more
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
        state: State = self._app[STATE]
        for task, request in list(state.active.items()):
            if request.transport is not None:
                request.transport.abort()
            task.cancel()

    def __enter__(self) -> SandboxHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def _snapshot(state: State) -> dict[str, Any]:
    return server_stats(state)


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
