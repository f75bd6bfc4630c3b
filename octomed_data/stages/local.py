"""The local executor (CLI and tests) and :func:`run_stage`, the one way any executor runs a stage.

:func:`run_stage` is the whole shard loop: pick the shards, hand the ones not yet done to an
executor's ``map``, drop outputs of vanished inputs on a full pass, check every input shard is
done, then finalise. Executors only decide where the runner's
:func:`~octomed_data.stages.runner.run_guarded` runs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Protocol

from octomed_data.stages.base import Runtime, ShardOutcome, Stage, StageFailed, StageResult
from octomed_data.stages.outcomes import Outcomes
from octomed_data.stages.runner import RetryPolicy, drive, endpoint_keys, run_guarded


class Executor(Protocol):
    """Runs each shard somewhere through the runner (:mod:`.runner`); returns every shard's outcome
    (never raises for one)."""

    def map(self, stage: Stage, shards: Sequence[str], *, force: bool) -> Mapping[str, ShardOutcome]: ...


class LocalExecutor:
    """Shards in this process, ``workers`` at a time (threads), with a progress bar on a terminal.

    Each attempt goes through the runner (:func:`~octomed_data.stages.runner.run_guarded`: keys,
    the shard's lease, fencing); a failed shard is tried ``retries`` more times (default none:
    the CLI fails fast) under the one :class:`~octomed_data.stages.runner.RetryPolicy`.
    """

    def __init__(self, workers: int = 1, progress: bool | None = None, retries: int = 0) -> None:
        self.workers = max(1, workers)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.policy = RetryPolicy(retries=retries)

    def map(
        self, stage: Stage, shards: Sequence[str], *, force: bool = False
    ) -> MutableMapping[str, ShardOutcome]:
        runtime = Runtime(api_keys=endpoint_keys(stage))

        def one(shard: str) -> ShardOutcome:
            attempt = lambda n: run_guarded(stage, shard, runtime, force=force, attempt=n)  # noqa: E731
            return self.policy.run(shard, attempt)

        desc = stage.name if self.progress and len(shards) > 1 else None
        return map_shards(one, shards, self.workers, desc)


def map_shards(
    one: Callable[[str], ShardOutcome],
    shards: Iterable[str],
    workers: int,
    progress: str | None = None,
    total: int | None = None,
) -> MutableMapping[str, ShardOutcome]:
    """``one(shard)`` for every shard, ``workers`` at a time (threads; in order when one), through
    the runner's one in-flight loop (:func:`~octomed_data.stages.runner.drive`), with a
    shards-done bar named ``progress`` (None: no bar; ``total``: its length, for an iterator)."""
    if total is None and isinstance(shards, Sequence):
        total = len(shards)
    bar = shard_progress_bar(total or 0, progress) if progress else None
    tick = (lambda _o: bar.update(1)) if bar is not None else None
    try:
        if workers <= 1 or total == 1:
            return drive(
                shards, 1, lambda s: s, lambda handles: next(iter(handles)), lambda s, _h: one(s), tick
            )
        with ThreadPoolExecutor(workers, thread_name_prefix="shard") as pool:
            return drive(
                shards,
                workers,
                lambda s: pool.submit(one, s),
                lambda handles: next(iter(wait(handles, return_when=FIRST_COMPLETED).done)),
                lambda _s, fut: fut.result(),
                tick,
            )
    finally:
        if bar is not None:
            bar.close()


def shard_progress_bar(total: int, desc: str):
    """The shards-done bar every executor shows on a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc=desc, file=sys.stderr, dynamic_ncols=True)


def run_stage(
    stage: Stage,
    executor: Executor | None = None,
    *,
    shards: Sequence[str | int] | None = None,
    force: bool | None = None,
    finalize: bool = True,
    also_pending: bool = False,
    on_outcome: Callable[[ShardOutcome], Any] | None = None,
) -> StageResult:
    """Run ``stage`` over its shards (all, or those named) with ``executor`` (default: local).

    Shards named explicitly are re-run even when done (``force`` defaults to "shards were named");
    a full pass skips done shards and un-commits outputs of input shards that vanished. The result
    lists failed and still-pending shards; :func:`raise_for_failures` turns them into one error
    line. Finalize runs only when every input shard is done. ``also_pending``: with shards named,
    also run every other shard that is not done (a downstream stage completing a repaired run).
    """
    executor = executor or LocalExecutor()
    result = StageResult(stage.name)
    with contextlib.ExitStack() as look:
        # One look at the markers per pass (each folder listed once, each marker read once),
        # dropped while shards run and taken again after: see Stage.viewing.
        look.enter_context(stage.viewing())
        selected = stage.select(shards)
        if shards and also_pending:
            chosen = set(selected)
            others = [s for s in stage.input_shards() if s not in chosen]
            others_done = done_map(stage, others)
            selected += [s for s in others if not others_done[s]]
        force = bool(shards) if force is None else force
        # Done shards are answered here from their markers: no task, no actor call, no request.
        named = set(stage.select(shards)) if force else set()
        done = done_map(stage, [s for s in selected if s not in named])  # the global shard too
        todo = [s for s in selected if s in named or not done[s]]
        running = set(todo)  # sets, not lists: a pass is linear in shards
        for s in selected:
            if s not in running:
                result.outcomes[s] = ShardOutcome(s, "REUSED", stage.done_counts(s))
        outcomes = Outcomes()  # this pass's own (kept compactly, as the result's)
        if todo:
            look.close()  # shards write markers now: what was read is no longer the truth
            outcomes.update(executor.map(stage, todo, force=force))
            result.outcomes.update(outcomes)
            look.enter_context(stage.viewing())
        if outcomes and not stage.global_step:
            # A shard done before this pass can be stale after it (an ingest entry whose duplicates
            # were judged against an entry this pass re-ingested): one more round runs exactly those.
            reused = [s for s, o in result.outcomes.items() if o.state == "REUSED"]
            now_done = done_map(stage, reused)
            stale = [s for s in reused if not now_done[s]]
            if stale:
                look.close()
                again = executor.map(stage, stale, force=False)
                result.outcomes.update(again)
                outcomes.update(again)
                look.enter_context(stage.viewing())
        if on_outcome is not None:
            for o in outcomes.values():
                on_outcome(o)
        inputs = stage.input_shards()
        if not shards and not stage.global_step:
            result.stale = stage.drop_stale(inputs)
        if not stage.global_step:
            failed = result.failed  # a property over every outcome: once, not once per shard
            checked = [s for s in inputs if s not in failed]
            if outcomes:
                now_done = done_map(stage, checked)
            else:  # nothing written this pass: the first answers still hold
                now_done = {s: done[s] if s in done else stage.is_done(s) for s in checked}
            result.pending = [s for s in checked if not now_done[s]]
        if finalize and not result.failed and not result.pending:
            # Inside the look: a finalize reads the markers it needs from it (it writes none).
            result.final = stage.finalize(inputs)
    return result


def done_map(stage: Stage, shards: Sequence[str], threads: int = 16) -> dict[str, bool]:
    """``stage.is_done`` for many shards; concurrently, since outside a pass's look
    (:meth:`Stage.viewing`) each is a few small storage reads; inside one, answered from it."""
    if stage.looking() or len(shards) <= threads:
        return {s: stage.is_done(s) for s in shards}
    with ThreadPoolExecutor(threads, thread_name_prefix=f"{stage.name}-done") as pool:
        return dict(zip(shards, pool.map(stage.is_done, shards), strict=True))


def raise_for_failures(result: StageResult, hint: Callable[[list[str]], str] | None = None) -> None:
    """One error line naming the failed and pending shards (and how to re-run them)."""
    bad = sorted(result.failed)
    if bad:
        first = result.failed[bad[0]]
        msg = f"{len(bad)} {result.stage} shard(s) failed: {bad}; first error: {first}"
        raise StageFailed(msg + (f"; {hint(bad)}" if hint else ""))
    if result.pending:
        msg = f"{result.stage}: shard(s) {result.pending} are not done yet"
        raise StageFailed(msg + (f"; {hint(result.pending)}" if hint else ""))
