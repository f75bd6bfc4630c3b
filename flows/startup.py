"""Starting the main job's own services on a busy machine: the embedded Prefect API and local Ray.

``octomed-data demo`` / ``run`` without ``PREFECT_API_URL`` start an ephemeral Prefect API server
(a uvicorn subprocess that imports the server and migrates a SQLite database), and the distill flow
starts a private local Ray (GCS, raylet, workers). On an idle machine both take a few seconds; on a
loaded 2-core machine Prefect's default 20 s start limit and Ray's fixed 30 s raylet registration
wait were seen to run out ("Timed out while attempting to connect to ephemeral Prefect API
server", "The current node timed out during startup"). Here both get a limit fit for that machine
and ONE retry, with one log line saying so:

* :func:`ensure_prefect_api`: starts the ephemeral API before the first flow (only when no
  ``PREFECT_API_URL`` is set) with ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
  (default here :data:`PREFECT_START_TIMEOUT_S`, Prefect's own is 20 s); on a time-out the
  half-started server is stopped and a fresh one is started once more. Later flows find it running.
* :func:`connect_ray`: ``ray.init`` through :class:`tasks.ray_executor.RayPool`; a local start
  that fails is shut down and tried once more (Ray's 30 s raylet wait is not a setting). A Ray
  cluster at an address is not retried here: it is there or it is not.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

PREFECT_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
PREFECT_START_TIMEOUT_S = 90  # per try; Prefect's default is 20 s (too short under load)
START_TRIES = 2  # one retry

log = logging.getLogger("octomed_data.startup")


def busy_machine_defaults() -> None:
    """Start limits for the embedded Prefect API fit for a loaded machine (an explicit setting wins).

    Must run before Prefect reads its settings (before the first ``import prefect``) to be seen by
    every later Prefect call; :func:`ensure_prefect_api` also passes the limit explicitly."""
    os.environ.setdefault(PREFECT_TIMEOUT_ENV, str(PREFECT_START_TIMEOUT_S))


def prefect_start_timeout() -> int:
    try:
        return max(1, int(float(os.environ.get(PREFECT_TIMEOUT_ENV) or PREFECT_START_TIMEOUT_S)))
    except ValueError:
        return PREFECT_START_TIMEOUT_S


def with_retry(
    start: Callable[[], Any], undo: Callable[[], None], what: str, tries: int = START_TRIES
) -> Any:
    """``start()``; when it raises, ``undo()`` and start again, ``tries`` times in all (the last
    error propagates). One warning line per failed try."""
    for attempt in range(1, tries + 1):
        try:
            return start()
        except Exception as exc:
            if attempt == tries:
                raise
            line = (
                f"{what} did not start (try {attempt} of {tries}): {str(exc).splitlines()[0][:300]}; retrying"
            )
            log.warning(line)
            undo()
    return None  # unreachable


def ensure_prefect_api() -> str | None:
    """Start the ephemeral Prefect API now, with the busy-machine limit and one retry; None when a
    ``PREFECT_API_URL`` is set (a real server: nothing to start) or ephemeral servers are off."""
    busy_machine_defaults()
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    timeout = prefect_start_timeout()
    holder: list[Any] = []

    def start() -> str:
        server = SubprocessASGIServer()  # one per process (Prefect's own singleton): later flows reuse it
        holder[:] = [server]
        server.start(timeout=timeout)
        return server.api_url

    def undo() -> None:
        # A timed-out start leaves its uvicorn process running and the singleton registered: stop
        # both, so the retry starts a fresh server on a fresh port.
        if holder:
            holder[0].stop()

    return with_retry(start, undo, f"the embedded Prefect API (limit {timeout} s)")


def connect_ray(address: str | None) -> Any:
    """The process's Ray actor pool, connecting to (or, without ``address``, starting) Ray first;
    a local start that fails is cleaned up and tried once more."""
    import ray

    from tasks.ray_executor import RayPool

    if address is not None or ray.is_initialized():
        return RayPool.get(address)
    before = set(descendants())

    def undo() -> None:
        try:
            ray.shutdown()
        except Exception:  # nothing was started: nothing to stop
            pass
        # A start that timed out leaves its GCS, raylet and reaper running (Ray never learned of
        # them): stop the ones this try started, so the retry does not compete with them for CPU.
        for pid, cmdline in descendants().items():
            if pid not in before and "ray" in cmdline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:  # gone already
                    pass

    return with_retry(lambda: RayPool.get(address), undo, "local Ray")


def descendants() -> dict[int, str]:
    """pid -> command line of every descendant of this process (Linux ``/proc``; empty elsewhere)."""
    parent: dict[int, int] = {}
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return {}
    for name in names:
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
            parent[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out: dict[int, str] = {}
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        for child in (c for c, p in parent.items() if p == pid):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as fh:
                    out[child] = fh.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                out[child] = ""
            todo.append(child)
    return out
