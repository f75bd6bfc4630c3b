"""Which of the shards a command was asked for are not committed after a pass, and why, in one line.

Every command line entry point exits 0 only when every shard it was asked for is committed (its
done-signal, :meth:`~octomed_data.stages.base.Stage.is_done`); otherwise it names the shards that
are not and why, grouped by reason: the lease held by another run, the lease lost mid-shard, the
store unreachable, or the shard's own failure. The reasons are read from the one-line errors the
runner keeps per shard (:attr:`StageResult.failed`), so they hold for every executor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from octomed_data.errors import OctomedError
from octomed_data.layout import RunPaths
from octomed_data.stages.base import GLOBAL_SHARD, Stage, StageFailed, StageResult

if TYPE_CHECKING:
    from octomed_data.stages.local import Executor

LEASE_HELD = "lease held by another run"
LEASE_LOST = "lease lost"
STORE_UNREACHABLE = "store unreachable"
NOT_DONE = "not done"

# Transport failures of an object store or file system (botocore, aiohttp, OS), by name or wording.
UNREACHABLE = re.compile(
    r"\b(EndpointConnectionError|ConnectTimeoutError|ReadTimeoutError|ConnectionClosedError|"
    r"ConnectionError|ConnectionRefusedError|ConnectionResetError|ServerDisconnectedError|"
    r"ClientConnectorError|TimeoutError|timed out|Could not connect|unreachable)\b",
    re.IGNORECASE,
)
ERROR_HEAD = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*): (?P<message>.*)$", re.DOTALL)
MAX_REASON_CHARS = 200


class ShardsNotCommitted(StageFailed):
    """Some shards a command was asked for are not committed; ``missing`` maps each to its reason."""

    def __init__(self, message: str, missing: Mapping[str, str]) -> None:
        super().__init__(message)
        self.missing = dict(missing)


def reason(error: str | None) -> str:
    """Why a shard is not committed, from its one-line error (:func:`~.base.describe_error`)."""
    text = (error or "").strip()
    if not text:
        return "failed"
    head = text.split(" <- caused by ", 1)[0]
    if head.startswith("LeaseLost"):
        return LEASE_LOST
    if head.startswith("LeaseHeld"):
        return LEASE_HELD
    if UNREACHABLE.search(text):  # a StorageError says "unreachable" or keeps the transport's error
        return STORE_UNREACHABLE
    short = text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
    return f"failed: {short}"


def not_committed(
    result: StageResult, shards: Sequence[str] | None = None, details: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The asked-for shards (default: every shard of the pass) that are not committed, with reasons.

    A failed shard's reason comes from its error; a shard that ran but is not done (``pending``)
    takes ``details[shard]`` (what the stage knows, e.g. "3 sample(s) failed") or "not done".
    """
    asked = list(shards) if shards else list(dict.fromkeys([*result.outcomes, *result.pending]))
    failed = result.failed
    pending = set(result.pending)
    missing: dict[str, str] = {}
    for shard in asked:
        if shard in failed:
            why = reason(failed[shard])
            transport = why in (LEASE_HELD, LEASE_LOST, STORE_UNREACHABLE)  # outranks the stage's note
            missing[shard] = why if transport else (details or {}).get(shard) or why
        elif shard in pending:
            missing[shard] = (details or {}).get(shard) or NOT_DONE
    return missing


def not_committed_line(stage: str, missing: Mapping[str, str], asked: int | None = None) -> str:
    """``3 of 5 distill shard(s) not committed: 00001, 00002 (lease lost); 00004 (store unreachable)``."""
    by_reason: dict[str, list[str]] = {}
    for shard, why in missing.items():
        by_reason.setdefault(why, []).append(shard)
    parts = [f"{', '.join(sorted(names))} ({why})" for why, names in by_reason.items()]
    of = f" of {asked}" if asked is not None and asked >= len(missing) else ""
    return f"{len(missing)}{of} {stage} shard(s) not committed: {'; '.join(parts)}"


def raise_unless_committed(
    result: StageResult,
    shards: Sequence[str] | None = None,
    details: Mapping[str, str] | None = None,
    hint: str = "run the same command again to complete them",
) -> None:
    """Raise :class:`ShardsNotCommitted` (one line) unless every asked-for shard is committed."""
    missing = not_committed(result, shards, details)
    if not missing:
        return
    asked = len(shards) if shards else len(set(result.outcomes) | set(result.pending))
    line = not_committed_line(result.stage, missing, asked)
    raise ShardsNotCommitted(f"{line}; {hint}" if hint else line, missing)


def user_message(error: str) -> str | None:
    """The message of a failure that is the user's to fix (an :class:`OctomedError` that is not a
    lease or store problem), without its type name; None for anything else."""
    match = ERROR_HEAD.match(error.strip())
    if match is None or reason(error) in (LEASE_HELD, LEASE_LOST, STORE_UNREACHABLE):
        return None
    return match["message"] if match["name"] in octomed_error_names() else None


def octomed_error_names() -> set[str]:
    """The names of every user-error class defined so far (:class:`OctomedError` and its subclasses)."""
    names: set[str] = set()
    todo: list[type] = [OctomedError]
    while todo:
        cls = todo.pop()
        if cls.__name__ not in names:
            names.add(cls.__name__)
            todo.extend(cls.__subclasses__())
    return names


def raise_for_global_step(result: StageResult) -> None:
    """A global step's pass as the command line reports it: its user error as that one line (the
    message the step raised), anything else as :func:`raise_unless_committed`'s line."""
    error = result.failed.get(GLOBAL_SHARD)
    if error is not None:
        message = user_message(error)
        if message is not None:
            raise ShardsNotCommitted(message, {GLOBAL_SHARD: reason(error)})
    raise_unless_committed(result, [GLOBAL_SHARD])


def run_global_step(stage: Stage, executor: Executor | None = None) -> dict[str, Any]:
    """A command's global step the one way (:func:`~.local.run_stage`: reused when its marker is
    committed for these settings and inputs, else built); its counts, or one error line
    (:func:`raise_for_global_step`) when it is not committed."""
    from octomed_data.stages.local import LocalExecutor, run_stage

    result = run_stage(stage, executor or LocalExecutor(progress=False))
    raise_for_global_step(result)
    return result.outcomes[GLOBAL_SHARD].counts


def failed_attempts(paths: RunPaths, stage: str, since: float) -> dict[str, str]:
    """Shards of ``stage`` whose last attempt, recorded at or after ``since`` (epoch seconds),
    FAILED, with the reason. For a message when only a pass's error is at hand (a library
    function that raised); the attempt records never decide what runs."""
    import datetime as dt

    from octomed_data import storage

    found: dict[str, str] = {}
    for uri in storage.list_files(paths.state_dir(stage), ".json"):
        try:
            record = storage.read_json(uri)
            when = dt.datetime.fromisoformat(record.get("updated_at") or "").timestamp()
        except Exception:  # an unreadable record says nothing
            continue
        if record.get("state") in ("FAILED", "CANCELLED") and when >= since and record.get("shard"):
            found[str(record["shard"])] = reason(record.get("error"))
    return found


def reraise_with_reasons(exc: StageFailed, paths: RunPaths, stage: str, since: float) -> None:
    """Raise ``exc`` again as the one not-committed line (every failed shard with its reason) when
    the stage's attempt records since ``since`` name them; else ``exc`` itself."""
    missing = failed_attempts(paths, stage, since)
    if not missing:
        raise exc
    line = not_committed_line(stage, missing)
    raise ShardsNotCommitted(f"{line}; run the same command again to complete them", missing) from None
