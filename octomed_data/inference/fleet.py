"""Teacher fleets: one teacher served by several replicas, behind one transport.

Teams serving DeepSeek-R1 (or a distill of it) themselves run many vLLM/SGLang replicas. A teacher
that lists ``endpoints`` gets a :class:`FleetTransport`: a router over one transport per replica
that the :class:`~octomed_data.inference.client.EndpointClient` uses like any other transport, so
retries, the rate limiter (per teacher, not per replica), the in-flight bound and the teacher's
breaker are unchanged.

* Each request goes to the healthy replica with the fewest requests in flight (ties: the one that
  served fewest), which spreads load by what each replica actually has queued.
* A replica whose request fails at the connection level (refused, reset, timeout, HTTP 5xx) is
  ejected at once. While another replica is healthy the failure is reported as a *failover*
  (:class:`ReplicaDown`): retryable with no backoff and not an outage, so the retry goes straight
  to another replica and the teacher's breaker does not count one replica's death against the
  teacher. Only when every replica is out do failures reach the breaker as outages, and the
  teacher's outage budget decides when the shard fails, exactly as for a single endpoint.
* An ejected replica is probed after ``probe_after_s`` (doubling per failed probe, up to
  ``probe_max_s``): a ``GET /models`` when its transport has ``probe()``, otherwise the next real
  request is the probe. A probe that answers takes the replica back.
* Every reply carries the replica that served it (:func:`served_by`), named by
  :func:`public_url`: no user info, query or fragment, so no secret reaches a row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from octomed_data.inference.retry import Failure

if TYPE_CHECKING:
    from octomed_data.inference.wire import Transport

log = logging.getLogger("octomed_data.inference")

DEFAULT_PROBE_TIMEOUT_S = 5.0


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment (where keys hide), and no trailing slash."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class Served:
    """A reply and the replica that served it; reads as the reply (every attribute is the reply's)."""

    __slots__ = ("endpoint", "response")

    def __init__(self, response: Any, endpoint: str) -> None:
        self.response = response
        self.endpoint = endpoint

    def __getattr__(self, name: str) -> Any:
        return getattr(self.response, name)


def served_by(response: Any) -> str | None:
    """The replica (public URL) that served a fleet's reply; None for a single endpoint's."""
    return response.endpoint if isinstance(response, Served) else None


class ReplicaDown(Exception):
    """A replica failed at the connection level while another is healthy: retry elsewhere, now."""

    def __init__(self, url: str, failure: Failure) -> None:
        super().__init__(f"{failure} at replica {url}; failing over to another replica")
        self.url = url
        self.failure = failure


@dataclass
class Replica:
    """One replica's routing state (read by tests and logs; changed only by the fleet)."""

    url: str  # public URL (see public_url)
    transport: Transport
    in_flight: int = 0
    served: int = 0  # replies it returned
    ejections: int = 0
    ejected: bool = False
    retry_at: float = 0.0  # when an ejected replica is probed next
    cooldown: float = 0.0  # current probe interval (doubles per failed probe)
    probing: bool = False  # a probe (or a trial request) is in flight
    last_error: str | None = None


class FleetTransport:
    """A transport over N replica transports: least in-flight among healthy, eject, probe back."""

    def __init__(
        self,
        replicas: Sequence[tuple[str, Transport]],
        *,
        name: str = "fleet",
        probe_after_s: float = 5.0,
        probe_max_s: float = 60.0,
        probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not replicas:
            raise ValueError("a fleet needs at least one replica")
        self.name = name
        self.replicas = [Replica(public_url(url), transport) for url, transport in replicas]
        self.probe_after_s = probe_after_s
        self.probe_max_s = max(probe_max_s, probe_after_s)
        self.probe_timeout_s = probe_timeout_s
        self.clock = clock
        self._probes: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ routing
    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if not r.ejected]

    def pick(self) -> Replica:
        """The replica for the next request (probes of ejected replicas start here when due)."""
        trial = self._start_due_probes(self.clock())
        if trial is not None:
            return trial
        healthy = self.healthy()
        if healthy:
            return min(healthy, key=lambda r: (r.in_flight, r.served))
        # Every replica is out: send anyway (a reply takes that replica back). These failures
        # reach the teacher's breaker as outages: its outage budget fails the shard, as for one URL.
        return min(self.replicas, key=lambda r: (r.in_flight, r.retry_at))

    async def chat(self, **kwargs: Any) -> Served:
        """Send one chat completion to the picked replica; the reply says which one served it."""
        replica = self.pick()
        was_out = replica.ejected  # a trial, or every replica was out
        replica.in_flight += 1
        try:
            response = await replica.transport.chat(**kwargs)
        except Exception as exc:
            failure = replica.transport.classify(exc)
            if not failure.outage:
                self._answered(replica)  # a 4xx / 429 / malformed body: the replica is up
                raise
            self._eject(replica, str(failure), again=was_out)
            if self.healthy():
                raise ReplicaDown(replica.url, failure) from exc
            raise
        finally:
            replica.in_flight -= 1
        self._answered(replica)
        replica.served += 1
        return Served(response, replica.url)

    async def probe(self) -> None:
        """The teacher's health probe: answered when any replica answers its own probe (a replica
        with no ``probe()`` counts as answering: its requests are its probes)."""
        probes = [getattr(r.transport, "probe", None) for r in self.replicas]
        if any(p is None for p in probes):
            return
        tasks = [asyncio.ensure_future(p()) for p in probes]  # a hung replica must not hide the rest
        error: BaseException | None = None
        try:
            for done in asyncio.as_completed(tasks):
                try:
                    await done
                    return
                except Exception as exc:  # this replica is out: wait for the others
                    error = exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert error is not None
        raise error

    def classify(self, exc: BaseException) -> Failure:
        """A failover is retryable at once and no outage; anything else as the replicas classify it."""
        if isinstance(exc, ReplicaDown):
            return Failure(str(exc), True, delay=0.0, outage=False)
        return self.replicas[0].transport.classify(exc)

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()
        if self._probes:
            await asyncio.gather(*self._probes, return_exceptions=True)
        for r in self.replicas:
            await r.transport.close()

    def snapshot(self) -> list[dict[str, Any]]:
        """Per replica: URL, healthy, in flight, served, ejections, last error (for reports, tests)."""
        return [
            {
                "url": r.url,
                "healthy": not r.ejected,
                "in_flight": r.in_flight,
                "served": r.served,
                "ejections": r.ejections,
                "last_error": r.last_error,
            }
            for r in self.replicas
        ]

    # ------------------------------------------------------------------ health
    def _answered(self, replica: Replica) -> None:
        replica.probing = False
        if replica.ejected:
            self._restore(replica, "a request")

    def _eject(self, replica: Replica, error: str, again: bool) -> None:
        """Take ``replica`` out; ``again``: the failed request was sent while it was out already."""
        replica.last_error = error
        now = self.clock()
        if replica.ejected:
            if again:
                # A probe or trial failed (or a request sent while every replica was out):
                # wait longer before the next probe.
                replica.probing = False
                replica.cooldown = min(self.probe_max_s, max(replica.cooldown, self.probe_after_s) * 2)
                replica.retry_at = now + replica.cooldown
            # else: another request that was in flight when the replica went down
            return
        replica.probing = False
        replica.ejected = True
        replica.ejections += 1
        replica.cooldown = self.probe_after_s
        replica.retry_at = now + replica.cooldown
        up = len(self.healthy())
        log.warning(
            "teacher %r: replica %s ejected (%s); %d of %d replicas up; probing it in %.1f s",
            self.name,
            replica.url,
            error,
            up,
            len(self.replicas),
            replica.cooldown,
        )

    def _restore(self, replica: Replica, how: str) -> None:
        replica.ejected = False
        replica.cooldown = 0.0
        log.info(
            "teacher %r: replica %s back (%s answered); %d of %d replicas up",
            self.name,
            replica.url,
            how,
            len(self.healthy()),
            len(self.replicas),
        )

    def _start_due_probes(self, now: float) -> Replica | None:
        """Start the probes that are due; a replica with no probe() gets this request as its trial."""
        trial: Replica | None = None
        for r in self.replicas:
            if not r.ejected or r.probing or now < r.retry_at:
                continue
            r.probing = True
            probe = getattr(r.transport, "probe", None)
            if probe is None:
                if trial is None:
                    trial = r
                else:
                    r.probing = False  # the next request is its trial
                continue
            task = asyncio.ensure_future(self._probe(r, probe))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
        return trial

    async def _probe(self, replica: Replica, probe: Callable[[], Any]) -> None:
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                await probe()
        except asyncio.CancelledError:
            replica.probing = False
            raise
        except Exception as exc:  # any failed probe: the replica stays out, probed later
            self._eject(replica, f"probe failed: {type(exc).__name__}", again=True)
            return
        replica.probing = False
        if replica.ejected:
            self._restore(replica, "a probe")


def describe(urls: Sequence[str]) -> str:
    """How logs and errors name a teacher's endpoint(s): one URL, or the fleet's first and count."""
    first = public_url(urls[0])
    return first if len(urls) == 1 else f"{first} (+{len(urls) - 1} more replicas)"
