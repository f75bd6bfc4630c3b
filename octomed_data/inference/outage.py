"""THE outage rule: a teacher that gives no reply is waited for, for its outage budget, then the shard fails.

One rule for every way a teacher can give no reply: connection refused (a restart, a vLLM server
still loading its model), reset or dropped connections, HTTP 5xx, timeouts, and a *hung* server
(accepts connections, never answers). While the teacher gives no reply for less than its
``outage_budget_s`` (default :data:`DEFAULT_OUTAGE_BUDGET_S`), no shard fails: requests wait
and retry with backoff (capped at :meth:`OutageBreaker.retry_max_s` so a teacher that is back is
noticed within seconds), and failures while the teacher is down do not use up a request's
``max_attempts`` (:func:`~octomed_data.inference.client.request_with_retries` asks
:meth:`OutageBreaker.down`: no reply since the attempt was sent and no answer to a shared health
probe; a server that answers the probe is up, and the failure is the request's own, counted as
before), so the shard goes on, with exact output, once the teacher answers again (``max_attempts: 1`` turns every retry off, these
included: each request is sent once). Once the budget is spent with no reply in between,
:class:`OutageBreaker` trips with ONE line naming the teacher, its URL, the failure mode
(``connection refused``, ``HTTP 503``, ``hung: ...``) and the last error; every request of the
shard stops at once (requests asleep in a backoff or hung in flight are woken or cancelled).
Meanwhile a line is logged every ``log_every_s`` (5 s by default) while the outage lasts:
``teacher 'r1' at URL unreachable (connection refused): 23 of 120 s outage budget spent, 48
requests waiting; retrying with backoff ...``. The budget is time, not a count of failures: 8
failures in 0.0 s are no outage.

**A hung server versus a long generation.** A non-streamed chat completion sends nothing until
the whole reply is generated (an 8k-token reasoning trace takes minutes), so silence on a chat
request says nothing. The rule is told by health probes instead: while requests are in flight
and nothing has been heard from the teacher for ``health_probe_s`` (30 s by default), the
watchdog sends ``GET {base_url}/models`` (every OpenAI-compatible server answers it: OpenAI,
DeepSeek, vLLM, SGLang, llama.cpp; vLLM answers it from its API server's event loop whatever the
engine is generating), bounded by ``health_probe_timeout_s`` (10 s), and again every
``health_probe_s`` while requests stay in flight. A probe that gets no answer (timeout, refused,
5xx) is an outage failure (mode ``hung: ...`` for a timeout) and starts the budget; any answer
below 500 means the server is alive and a hung outage ends. So a hung teacher fails its shard
within ``health_probe_s + health_probe_timeout_s + outage_budget_s`` (160 s with the defaults,
under budget + 60 s), while a server generating for ten minutes keeps answering probes and is
never failed. A new connection that does not open in ``connect_timeout_s`` is a failure too (the
HTTP transport). The probe uses its own connection (the transport's pool has room beyond the
in-flight bound), so a pool full of long generations never starves it. What this does not catch:
a server that answers ``/models`` but never finishes one chat request; the teacher's
``timeout_s`` (600 s) bounds that request, as before.

The budget comes from the teacher's ``outage_budget_s`` (:func:`outage_budget_s`);
:func:`install_outage_budget` puts a breaker with a given budget on an endpoint client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from octomed_data.inference.retry import BREAKER_THRESHOLD, Breaker, Failure, log
from octomed_data.inference.wire import classify

DEFAULT_OUTAGE_BUDGET_S = 120.0
LOG_EVERY_S = 5.0
DEFAULT_PROBE_AFTER_S = 30.0
DEFAULT_PROBE_TIMEOUT_S = 10.0
OUTAGE_RETRY_MAX_S = 10.0  # the longest backoff in an outage: a teacher back is noticed this fast


def hung_mode(timeout_s: float) -> str:
    """The failure mode of a probe that got no answer in ``timeout_s``."""
    return f"hung: accepts connections, no answer to GET /models in {timeout_s:g} s"


class OutageBreaker(Breaker):
    """A :class:`Breaker` whose outage rule is time: ``budget_s`` seconds with no reply trips it.

    Connection-level failures (``Failure.outage``) never trip it by count; the never-worked rule
    (requests that gave up on replies such as HTTP 400, none succeeding) is the base class's. A
    watchdog task runs while requests are waiting: it logs the outage every ``log_every_s``,
    trips at the deadline, and sends health probes (``probe``, set by the endpoint client) while
    requests are in flight and the teacher has been silent for ``probe_after_s``.
    """

    time_based = True

    def __init__(
        self,
        name: str,
        url: str,
        threshold: int = BREAKER_THRESHOLD,
        clock: Callable[[], float] = time.monotonic,
        *,
        budget_s: float = DEFAULT_OUTAGE_BUDGET_S,
        log_every_s: float | None = None,
        probe_after_s: float = DEFAULT_PROBE_AFTER_S,
        probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    ) -> None:
        super().__init__(name, url, threshold, clock)
        self.budget_s = budget_s
        # A line every few seconds; more often for a budget of a few seconds (tests, tight configs).
        self.log_every_s = (
            log_every_s if log_every_s is not None else min(LOG_EVERY_S, max(0.1, budget_s / 4))
        )
        self.probe_after_s = probe_after_s
        self.probe_timeout_s = probe_timeout_s
        self.probe: Callable[[], Awaitable[Any]] | None = None  # GET /models of the transport
        self.outage_since: float | None = None  # first failure with no reply since
        self.outage_failures = 0
        self.outage_mode: str | None = None  # the latest failure's mode
        self.last_server_error: str | None = None
        self.waiting = 0  # requests inside request_with_retries (in flight or backing off)
        self.probes = 0  # health probes sent (tests, logs)
        self._outage_token = 0
        self._logged_at = float("-inf")
        self._quiet_since = self.clock()  # last time the teacher was heard (or nothing was in flight)
        self._watch: asyncio.Task[None] | None = None
        self._check: asyncio.Future[bool] | None = None  # the shared "is it down?" probe
        self._check_started = float("-inf")

    @property
    def retry_max_s(self) -> float:
        """The longest backoff in an outage: a tenth of the budget, at most 10 s."""
        return min(OUTAGE_RETRY_MAX_S, max(0.05, self.budget_s / 10))

    # ------------------------------------------------------------------ the rule
    def replied(self) -> None:
        if self.outage_since is not None and not self.tripped:
            log.info(
                "teacher %r at %s answers again after %.0f s without a reply (%d failed attempts)",
                self.name,
                self.url,
                self.clock() - self.outage_since,
                self.outage_failures,
            )
        super().replied()
        self._end_outage()

    def _end_outage(self) -> None:
        self.outage_since = None
        self.outage_failures = 0
        self.outage_mode = None
        self._outage_token += 1  # a pending budget check belongs to an outage that ended
        self._quiet_since = self.clock()

    def failed(self, request: int, failure: Failure, error: str) -> None:
        if not failure.outage:
            super().failed(request, failure, error)  # the server answered: replied()
            return
        now = self.clock()
        if self.outage_since is None:
            self.outage_since = now
            self._arm(self._outage_token)
        self.outage_failures += 1
        self.outage_mode = failure.mode
        self.last_server_error = error
        self.last_error = error
        self._log_outage(now)
        if now - self.outage_since >= self.budget_s:
            self._spent(now)

    def _log_outage(self, now: float) -> None:
        if self.tripped or self.outage_since is None or now - self._logged_at < self.log_every_s:
            return
        log.warning(
            "teacher %r at %s unreachable (%s): %.0f of %.0f s outage budget spent, %d requests "
            "waiting; retrying with backoff (last error: %s)",
            self.name,
            self.url,
            self.outage_mode,
            now - self.outage_since,
            self.budget_s,
            self.waiting,
            self.last_server_error,
        )
        self._logged_at = now

    def _arm(self, token: int) -> None:
        """Check again when the budget runs out, even if no attempt fails then (all asleep or hung)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): checked on the next failure
        loop.call_later(max(0.0, self.budget_s), self._deadline, token)

    def _deadline(self, token: int) -> None:
        if token == self._outage_token and self.outage_since is not None:
            self._spent(self.clock())

    def _spent(self, now: float) -> None:
        span = now - (self.outage_since if self.outage_since is not None else now)
        if self.successes:
            since = now - (self._last_success if self._last_success is not None else now)
            history = f"{self.successes} requests had succeeded, the last {since:.1f} s ago"
        else:
            history = "none succeeded"
        self.trip(
            f"teacher {self.name!r} at {self.url} unreachable ({self.outage_mode}) for {span:.1f} s: "
            f"outage budget of {self.budget_s:.0f} s spent ({self.outage_failures} consecutive failed "
            f"attempts, no reply; {self.waiting} requests waiting; {history}); "
            f"last server error: {self.last_server_error}"
        )

    # ------------------------------------------------------------------ the watchdog
    def enter(self) -> None:
        """A request starts waiting on this teacher (its retries included)."""
        self.waiting += 1
        self._ensure_watch()

    def leave(self) -> None:
        self.waiting -= 1

    def _ensure_watch(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        watch = self._watch
        if watch is not None and not watch.done() and watch.get_loop() is loop:
            return
        self._quiet_since = self.clock()
        self._watch = loop.create_task(self._watch_loop(), name=f"outage watchdog {self.name}")

    async def _watch_loop(self) -> None:
        tick = max(0.02, min(1.0, self.log_every_s, self.probe_after_s / 2))
        while not self.tripped and self.waiting > 0:
            await asyncio.sleep(tick)
            now = self.clock()
            if self.outage_since is not None:
                self._log_outage(now)
                if now - self.outage_since >= self.budget_s:
                    self._spent(now)
                    return
            if not self._in_flight:
                self._quiet_since = now  # nothing asked, nothing to hear: silence means nothing
            elif self.probe is not None and now - self._quiet_since >= self.probe_after_s:
                await self._probe_once()

    async def _probe_once(self) -> None:
        """One health probe: an answer below 500 ends a hung outage; no answer is an outage failure."""
        assert self.probe is not None
        self.probes += 1
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                await self.probe()
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            mode = hung_mode(self.probe_timeout_s)
            message = f"no answer to GET /models in {self.probe_timeout_s:g} s"
            self._probe_failed(Failure(message, True, outage=True, mode=mode))
        except Exception as exc:  # refused, reset, 5xx: what the chat requests will meet too
            failure = classify(exc)
            if failure.outage:
                self._probe_failed(Failure(f"health probe: {failure}", True, outage=True, mode=failure.mode))
            elif self.outage_since is not None and (self.outage_mode or "").startswith("hung"):
                self._end_outage()  # a 4xx: the server answered
        else:
            if self.outage_since is not None and (self.outage_mode or "").startswith("hung"):
                log.info("teacher %r at %s answers health probes again", self.name, self.url)
                self._end_outage()
        finally:
            self._quiet_since = self.clock()  # the next probe after another quiet spell

    async def down(self, since: float) -> bool:
        """Is the teacher down, asked after a request failed at ``since`` (``clock()`` time)?

        A health probe sent at or after ``since`` answers, shared by every request that asks
        meanwhile (a burst of failures costs one probe): no answer (refused, reset, 5xx, nothing
        in ``probe_timeout_s``) means down, so the failure uses up no attempt of the request and
        the outage budget decides; an answer below 500 means the server is up and the failure
        was the request's own (a dropped connection, a 500 for this prompt, its timeout), counted
        against its ``max_attempts`` as before. Without a probe, nothing is known: False.
        """
        if self.probe is None:
            return False
        check = self._check
        if check is None or self._check_started < since or check.get_loop() is not asyncio.get_running_loop():
            self._check_started = self.clock()
            check = self._check = asyncio.ensure_future(self._ask())
        return await asyncio.shield(check)

    async def _ask(self) -> bool:
        assert self.probe is not None
        self.probes += 1
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                await self.probe()
        except TimeoutError:
            return True
        except Exception as exc:  # what it means, as for a chat request
            return classify(exc).outage
        return False

    def _probe_failed(self, failure: Failure) -> None:
        self.failed(-1, failure, str(failure))

    async def close(self) -> None:
        """Stop the watchdog (the endpoint client closes)."""
        watch, self._watch = self._watch, None
        if watch is None or watch.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if watch.get_loop() is loop:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)


def outage_budget_s(teacher: Any) -> float:
    """The teacher's outage budget in seconds (``outage_budget_s`` on its config, else the default)."""
    value = getattr(teacher, "outage_budget_s", None)
    return float(value) if value else DEFAULT_OUTAGE_BUDGET_S


def outage_breaker(
    name: str, url: str, threshold: int, teacher: Any, budget_s: float | None = None
) -> OutageBreaker:
    """The breaker of a teacher's endpoint client: its budget and health-probe settings."""
    return OutageBreaker(
        name,
        url,
        threshold,
        budget_s=budget_s if budget_s is not None else outage_budget_s(teacher),
        probe_after_s=float(getattr(teacher, "health_probe_s", None) or DEFAULT_PROBE_AFTER_S),
        probe_timeout_s=float(getattr(teacher, "health_probe_timeout_s", None) or DEFAULT_PROBE_TIMEOUT_S),
    )


def install_outage_budget(client: Any, budget_s: float | None = None) -> Any:
    """Give an endpoint client an :class:`OutageBreaker` (same name, URL and threshold); returns it."""
    old = client.breaker
    if isinstance(old, OutageBreaker) and budget_s is None:
        return client
    breaker = outage_breaker(old.name, old.url, old.threshold, client.teacher, budget_s)
    breaker.clock = old.clock
    breaker.probe = getattr(client.transport, "probe", None)
    client.breaker = breaker
    return client
