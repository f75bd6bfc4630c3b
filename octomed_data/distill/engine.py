"""The async distillation engine: N teacher samples per question, durable and resumable.

For one questions shard: stream its questions, skip every sample key the journal already holds,
send the rest to the routed teacher with bounded in-flight requests (one semaphore per teacher),
a per-request timeout, a rate limiter, and retries with exponential backoff + jitter that honour
Retry-After. Each finished reply (reasoning, answer text, finish reason, refusal) is appended to
the journal and counts as done only once its journal segment is written; no verdict is made here
(rejection sampling is its own stage, :mod:`octomed_data.rejection`, so replies can be judged again
without paying a teacher twice). A request that still fails after ``max_attempts`` is journalled
as a failure (not done): the shard finishes anyway, reports it, and a re-run retries exactly
those. Samples routed to a ``mode: batch`` teacher go through the Batch API instead
(:mod:`octomed_data.distill.batch`), into the same journal as the same rows. At the end the
journal is compacted into ``OUT/raw`` (same shard name as the questions shard), whose committed
marker (complete, config fingerprint) is the shard's one done-signal.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.distill.journal import (
    AFTER_COMPACT,
    FAILED,
    KEY_COLUMNS,
    JournalWriter,
    committed_rows,
    iter_journal,
    raw_uri,
    read_done_keys,
    retire,
    row_key,
    sample_key,
)
from octomed_data.errors import ConfigError, OctomedError, StorageError
from octomed_data.inference.client import EndpointClient, request_with_retries, sample_seed
from octomed_data.inference.ratelimit import LocalRateLimiter, RateLimiter
from octomed_data.inference.replies import read_choice
from octomed_data.inference.retry import Backoff
from octomed_data.prompts import build_messages
from octomed_data.sandbox import SANDBOX_FINGERPRINT, SANDBOX_TEACHER
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, TaskType
from octomed_data.teachers import DistillConfig, TeacherConfig, resolve_api_key

log = logging.getLogger("octomed_data.distill")

STATE_DIR = "_distill"
# What happens to a shard's journal once it is compacted and the committed file checked:
# delete (default), archive, or keep. ``$OCTOMED_JOURNAL_AFTER_COMPACT`` overrides the default.
JOURNAL_ENV = "OCTOMED_JOURNAL_AFTER_COMPACT"


def journal_mode(mode: str | None = None) -> str:
    """The journal's fate after compaction: ``mode``, else ``$OCTOMED_JOURNAL_AFTER_COMPACT``, else delete."""
    mode = mode or os.environ.get(JOURNAL_ENV) or "delete"
    if mode not in AFTER_COMPACT:
        raise ConfigError(f"journal mode {mode!r}: choose from {', '.join(AFTER_COMPACT)}")
    return mode


@dataclass
class ShardReport:
    """What one run over one shard did (counts are exact)."""

    shard: str
    questions: int = 0
    expected: int = 0  # questions x samples
    stored_before: int = 0  # samples already in the journal when the run started
    new_samples: int = 0  # samples finished and persisted by this run
    stored: int = 0  # expected samples stored after this run (== expected when complete)
    failed: int = 0  # samples whose requests failed after all attempts (not done)
    requests: int = 0  # HTTP requests sent by this run (attempts)
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batches: int = 0  # Batch API batches submitted by this run (batch-mode teachers)
    batches_resumed: int = 0  # live batches of an earlier run collected by this one
    batch_requests: int = 0  # request lines this run put into batches
    batch_samples: int = 0  # samples stored from batch output by this run
    batch_fallback: int = 0  # samples sent online because their batch gave no reply
    batch_state: str | None = None  # this run's batches by status, e.g. "completed 2/2"
    complete: bool = False  # every expected sample is stored (no failures left)
    aborted: str | None = None  # why the run stopped early (teacher unreachable)
    seconds: float = 0.0
    raw_uri: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_fingerprint(config: DistillConfig) -> str:
    """What decides which samples a shard needs: samples, prompt version, teachers' model + params."""
    parts = {
        "samples": config.samples,
        "prompt_version": config.prompt_version,
        "seed": config.seed,
        # Per task type, without and with an image (routing goes by image presence).
        "routing": {
            f"{t.value}{'+image' if image else ''}": _route_id(config, t, image)
            for t in TaskType
            for image in (False, True)
        },
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _route_id(config: DistillConfig, task: TaskType, image: bool) -> str | None:
    try:
        t = config.teacher_for(task, image)
    except OctomedError:
        return None
    return f"{t.name}|{t.model}|{t.params_hash()}"


def is_shard_done(
    out: str, shard: str, config: DistillConfig | None = None, questions_uri: str | None = None
) -> bool:
    """True when ``OUT/raw`` holds ``shard`` committed complete (with ``config``, and from the
    current commit of the questions shard at ``questions_uri``, when given).

    The committed marker of the raw shard is the one done-signal: it carries ``complete``, the
    config fingerprint and the commit of the questions shard it was made from (re-decontaminated
    questions make it stale), and it is written only after the Parquet file it describes.
    """
    ds = storage.Dataset(raw_uri(out))
    info = ds.shard_info(shard)
    if info is None or not info.extra.get("complete"):
        return False
    if config is not None and info.extra.get("fingerprint") != config_fingerprint(config):
        return False
    if questions_uri is not None:
        q_info = storage.Dataset(questions_uri).shard_info(shard)
        if q_info is None or info.extra.get("input_committed_at") != q_info.committed_at:
            return False
    return storage.exists(storage.join(ds.uri, info.file))


@dataclass
class _Counters:
    new: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ShardRun:
    """One shard's request state: its journal, counters, backoff, and whether a teacher died.

    Distillation and difficulty grading (:mod:`octomed_data.distill.filtering`) send every request
    through :meth:`request` (THE request path, :func:`~octomed_data.inference.client.request_with_retries`);
    once a teacher's breaker trips, :attr:`abort` says why and every request of the run stops.
    """

    def __init__(
        self,
        config: DistillConfig,
        out: str,
        shard: str,
        clients: Mapping[str, EndpointClient],
        limiter: RateLimiter,
        progress: Any,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.out = out
        self.shard = shard
        self.clients = clients
        self.limiter = limiter
        self.progress = progress
        self.counters = _Counters()
        self.journal = JournalWriter(
            out, shard, config.flush_every, config.flush_interval_s, on_durable=self._durable
        )
        self.sleep = sleep
        self.backoff = Backoff(config.backoff_base_s, config.backoff_max_s)
        self.abort: str | None = None  # a teacher's breaker tripped: every request stops

    def _durable(self, stored: int, failed: int) -> None:
        # Done means durable: samples count once the journal segment holding them is written.
        self.counters.new += stored
        self.counters.failed += failed
        if self.progress is not None and stored:
            self.progress.update(stored)

    async def request(
        self, tc: EndpointClient, messages: list[dict[str, Any]], seed: int, n: int, prompt_chars: int
    ) -> tuple[Any | None, int, float, str | None]:
        """(response or None, attempts, latency of the successful attempt, last error)."""
        kwargs = request_kwargs(tc, messages, seed, n)

        def attempted(attempt: int) -> None:
            self.counters.requests += 1
            if attempt > 1:
                self.counters.retries += 1

        response, attempts, latency, last_error = await request_with_retries(
            tc,
            kwargs,
            max_attempts=self.config.max_attempts,
            backoff=self.backoff,
            limiter=self.limiter,
            estimate=prompt_chars // 4 + int(tc.avg_completion) * n,
            n=n,
            sleep=self.sleep,
            stop=lambda: self.abort,
            on_attempt=attempted,
        )
        if response is None and tc.breaker.tripped and not self.abort:
            self.abort = tc.breaker.tripped  # the shard stops; what is journalled stays
        return response, attempts, latency, last_error


def request_kwargs(tc: EndpointClient, messages: list[dict[str, Any]], seed: int, n: int) -> dict[str, Any]:
    """The chat-completions request for ``n`` samples of one question (online or in a batch)."""
    teacher = tc.teacher
    return {
        "model": teacher.model,
        "messages": messages,
        "temperature": teacher.temperature,
        "top_p": teacher.top_p,
        "max_tokens": teacher.max_tokens,
        **tc.request_fields(seed, n),
    }


def reply_fields(choice: Any) -> dict[str, Any]:
    """What is stored of one choice: reasoning, answer text, refusal, finish reason (no verdict)."""
    msg = choice.message
    reply = read_choice(choice)
    refusal = getattr(msg, "refusal", None)
    return {
        "reasoning": reply.reasoning,
        "response": reply.answer if reply.answer else (refusal or None),
        "refusal": refusal or None,
        "finish_reason": choice.finish_reason,
    }


def _base_row(
    q: Mapping[str, Any],
    teacher: TeacherConfig,
    config: DistillConfig,
    idx: int,
    seed: int | None,
    params_hash: str,
) -> dict[str, Any]:
    return {
        "question_id": q["question_id"],
        "source": q["source"],
        "task_type": q["task_type"],
        "sample_idx": idx,
        "seed": seed,
        "teacher": teacher.name,
        "model": teacher.model,
        "prompt_version": config.prompt_version,
        "params_hash": params_hash,
        "gold_answer": q["answer"],
    }


async def _sample_group(
    run: ShardRun, q: Mapping[str, Any], tc: EndpointClient, messages: list[dict[str, Any]], group: list[int]
) -> None:
    """Request samples ``group`` of one question: one request (with ``n`` when it has several)."""
    teacher = tc.teacher
    prompt_chars = sum(len(str(m["content"])) for m in messages)
    seeds = {i: sample_seed(run.config.seed, q["question_id"], i) for i in group}
    sent = seeds[group[0]]
    async with tc.slots:
        response, attempts, latency, error = await run.request(tc, messages, sent, len(group), prompt_chars)
    # Rows record the seed the request carried (one for all samples of an n-request; none when
    # the teacher's seed policy is off), never a seed that was not sent.
    recorded = {i: (sent if tc.sends_seed else None) for i in group}
    now_ms = int(time.time() * 1000)
    leftover: list[int] = []
    if response is None:
        for i in group:
            row = _base_row(q, teacher, run.config, i, recorded[i], tc.params_hash)
            row.update(reject_reason=FAILED, attempts=attempts, error=error, created_at=now_ms)
            run.journal.add(row)
    else:
        leftover = add_reply_rows(run, q, tc, group, response, recorded[group[0]], attempts, latency)
    for i in leftover:
        await _sample_group(run, q, tc, messages, [i])


def add_reply_rows(
    run: ShardRun,
    q: Mapping[str, Any],
    tc: EndpointClient,
    group: list[int],
    response: Any,
    seed: int | None,
    attempts: int,
    latency: float | None,
    batch_id: str | None = None,
    skip: Container[int] = (),
) -> list[int]:
    """Journal a reply's choices as samples ``group`` of ``q`` (one row each, ``skip`` left out);
    returns the samples it had no choice for (a server that returned fewer choices than asked).

    The one row builder for replies, online (``latency`` of the request) or from a batch
    (``batch_id``): ``seed`` is the seed the request carried (None when none was sent).
    """
    teacher = tc.teacher
    now_ms = int(time.time() * 1000)
    usage = getattr(response, "usage", None)
    choices = list(response.choices)[: len(group)]
    # Sandbox traces are never passed off as a real teacher's, whatever the config calls it.
    sandbox = getattr(response, "system_fingerprint", None) == SANDBOX_FINGERPRINT
    endpoint = tc.endpoint_of(response)
    for j, (i, choice) in enumerate(zip(group, choices, strict=False)):
        # Usage is per request: the prompt is billed once, completion split over choices.
        p_tok = (usage.prompt_tokens if usage else None) if j == 0 else 0
        c_tok = (usage.completion_tokens // len(choices)) if usage else None
        if i in skip:
            continue
        row = _base_row(q, teacher, run.config, i, seed, tc.params_hash)
        # The replica that served it (a fleet's), else the teacher's one URL; never a key or query.
        row.update(reply_fields(choice), endpoint=endpoint)
        if sandbox:
            row["teacher"] = SANDBOX_TEACHER
        row.update(
            prompt_tokens=p_tok,
            completion_tokens=c_tok,
            latency_s=None if latency is None else round(latency, 4),
            attempts=attempts,
            created_at=now_ms,
            batch_id=batch_id,
        )
        run.counters.prompt_tokens += p_tok or 0
        run.counters.completion_tokens += c_tok or 0
        run.journal.add(row)
    return group[len(choices) :]


def _open_clients(
    config: DistillConfig, api_keys: Mapping[str, str | SecretStr] | None, needed: Iterable[str]
) -> dict[str, EndpointClient]:
    # Each client fails its shard once its teacher's outage budget is spent (``outage_budget_s``):
    # every EndpointClient carries an OutageBreaker built from its teacher.
    return {
        name: EndpointClient(config.teacher(name), resolve_api_key(config.teacher(name), api_keys))
        for name in needed
    }


def _question_batches(questions_uri: str, shard: str) -> Iterable[list[dict[str, Any]]]:
    ds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    if not ds.is_committed(shard):
        raise StorageError(f"questions shard {shard!r} is not committed in {questions_uri}")
    for batch in ds.iter_batches(batch_size=256, shards=[shard]):
        yield batch.to_pylist()


def shard_names(questions_uri: str) -> list[str]:
    """The committed shards of a questions dataset (raises a clear error when there are none)."""
    manifest = storage.Dataset(questions_uri, QUESTION_SCHEMA).manifest()
    if not manifest:
        raise StorageError(f"no committed question shards in {questions_uri}")
    return list(manifest)


async def adistill_shard(
    questions_uri: str,
    shard: str,
    out: str,
    config: DistillConfig,
    *,
    api_keys: Mapping[str, str | SecretStr] | None = None,
    limiter: RateLimiter | None = None,
    progress: Any = None,
    journal: str | None = None,
    on_batch_state: Callable[[str], Any] | None = None,
) -> ShardReport:
    """Distill one questions shard into ``OUT/raw`` (resumable, idempotent).

    ``api_keys`` maps teacher name -> key (from a secret block); otherwise each teacher's env
    variable is read. ``limiter`` defaults to an in-process per-teacher budget. ``progress`` is
    anything with ``update(n)`` (a tqdm bar), called once per durable sample. ``journal``: what
    happens to the shard's journal once compacted and checked (:func:`journal_mode`).
    ``on_batch_state`` is called (in a worker thread) with the shard's batch states whenever they
    change (``mode: batch`` teachers, :mod:`octomed_data.distill.batch`).
    """
    mode = journal_mode(journal)
    started = time.monotonic()
    shard = storage.Dataset.shard_name(shard)
    report = ShardReport(shard=shard, raw_uri=raw_uri(out))
    q_info = storage.Dataset(questions_uri).shard_info(shard)
    input_committed_at = q_info.committed_at if q_info is not None else None
    if is_shard_done(out, shard, config, questions_uri):
        prior = storage.Dataset(raw_uri(out)).shard_info(shard).extra["report"]
        # Nothing was sent this time: every expected sample was already stored.
        report = ShardReport(
            **{
                **prior,
                "stored_before": prior["expected"],
                "new_samples": 0,
                "requests": 0,
                "retries": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
        )
        report.seconds = time.monotonic() - started
        return report
    storage.ensure_writable(out)
    storage.write_json(storage.join(out, STATE_DIR, "config.json"), config.public_dict())
    # Done keys: the committed raw shard (an earlier, incomplete pass) and the journal since.
    done, _ = await asyncio.to_thread(read_done_keys, out, shard)
    report.stored_before = 0
    # Every route this shard needs, resolved before any request: an image routed to a teacher
    # that does not take images is a ConfigError here, not a failed request later.
    needed = {
        config.teacher_for(t, image).name
        for t, image in await asyncio.to_thread(shard_routes, questions_uri, shard)
    }
    # Server kinds are detected over HTTP once per URL: off the event loop.
    clients = await asyncio.to_thread(_open_clients, config, api_keys, needed)
    limiter = limiter or LocalRateLimiter.for_teachers(config.teachers)
    run = ShardRun(config, out, shard, clients, limiter, progress)
    run.journal.start()
    batches = None
    if any(c.teacher.mode == "batch" for c in clients.values()) or await asyncio.to_thread(
        _has_batch_records, out, shard
    ):
        from octomed_data.distill.batch import BatchRun

        async def fallback(tc: EndpointClient, wanted: dict[str, list[int]]) -> None:
            await _fallback_online(run, questions_uri, shard, tc, wanted)

        batches = BatchRun(run, clients, fallback, on_batch_state)
    tasks: set[asyncio.Task[None]] = set()
    qids: dict[str, bool] = {}  # question id -> has an image (decides its route)
    # Tasks beyond the in-flight bound wait on a semaphore; keep a small queue of them, no more.
    limit = 2 * sum(c.teacher.max_in_flight for c in clients.values()) + 16
    try:
        if batches is not None:
            await batches.load()  # earlier runs' live batches: collected, never paid twice
        for batch in _question_batches(questions_uri, shard):
            for q in batch:
                qids[q["question_id"]] = bool(q.get("images"))
                report.questions += 1
                report.expected += config.samples
                tc = clients[config.route_of(q).name]
                t = tc.teacher
                pending = []
                stored = 0
                for i in range(config.samples):
                    key = sample_key(q["question_id"], t.model, config.prompt_version, tc.params_hash, i)
                    if key in done:
                        stored += 1
                    elif batches is None or key not in batches.live:  # a live batch brings it
                        pending.append(i)
                report.stored_before += stored
                if progress is not None and stored:
                    progress.update(stored)
                if not pending or run.abort:
                    continue
                messages = await _messages(q)
                if batches is not None and t.mode == "batch":
                    await batches.add(q, tc, messages, pending)
                    continue
                groups = [pending] if tc.supports_n and len(pending) > 1 else [[i] for i in pending]
                for group in groups:
                    # Bound the work in flight: wait for a slot before creating more tasks.
                    while len(tasks) >= limit:
                        finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        _raise_failed(finished)
                    tasks.add(asyncio.create_task(_sample_group(run, q, tc, messages, group)))
        if batches is not None:
            await batches.flush()
            tasks.add(asyncio.create_task(batches.collect(done)))  # polls while online requests run
        if tasks:
            finished, _ = await asyncio.wait(tasks)
            tasks = set()
            _raise_failed(finished)
    finally:
        for task in tasks:
            task.cancel()
        await run.journal.close()
        for c in clients.values():
            await c.close()
        if batches is not None:
            await batches.close()
    if batches is not None:
        await batches.finish()  # their rows are durable now: the batches are collected
        report.batches, report.batches_resumed = batches.submitted, batches.resumed
        report.batch_requests, report.batch_samples = batches.requests, batches.collected
        report.batch_fallback, report.batch_state = batches.fell_back, batches.summary()
    c = run.counters
    report.new_samples = c.new
    report.requests, report.retries = c.requests, c.retries
    report.prompt_tokens, report.completion_tokens = c.prompt_tokens, c.completion_tokens
    report.aborted = run.abort
    await asyncio.to_thread(
        compact_shard, out, shard, config, qids, report, started, mode, input_committed_at
    )
    log.info(
        "shard %s: %d questions, %d/%d samples stored (%d new, %d failed), %d requests",
        shard,
        report.questions,
        report.expected - report.failed,
        report.expected,
        report.new_samples,
        report.failed,
        report.requests,
    )
    return report


def _has_batch_records(out: str, shard: str) -> bool:
    from octomed_data.distill.batch import batch_dir

    return bool(storage.list_files(batch_dir(out, shard), ".json"))


async def _fallback_online(
    run: ShardRun, questions_uri: str, shard: str, tc: EndpointClient, wanted: dict[str, list[int]]
) -> None:
    """Request samples ``wanted`` (question id -> sample indices) online: what a batch lacked.

    Bounded like the main loop: at most about twice the teacher's in-flight requests are queued,
    so an expired batch of 50k multimodal requests never holds 50k prompts (images) at once.
    """
    tasks: set[asyncio.Task[None]] = set()
    limit = 2 * tc.teacher.max_in_flight + 16
    try:
        for batch in _question_batches(questions_uri, shard):
            for q in batch:
                group = wanted.get(q["question_id"])
                if not group or run.abort:
                    continue
                messages = await _messages(q)
                for g in [group] if tc.supports_n and len(group) > 1 else [[i] for i in group]:
                    while len(tasks) >= limit:
                        finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        _raise_failed(finished)
                    tasks.add(asyncio.create_task(_sample_group(run, q, tc, messages, g)))
        if tasks:
            finished, tasks = await asyncio.wait(tasks)
            _raise_failed(finished)
    finally:
        for task in tasks:
            task.cancel()


def _raise_failed(tasks: set[asyncio.Task[None]]) -> None:
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


def shard_routes(questions_uri: str, shard: str) -> set[tuple[str, bool]]:
    """The (task type, has an image) pairs of one questions shard: what its routing must cover
    (two small columns read, never the images themselves)."""
    import pyarrow.compute as pc

    ds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    if not ds.is_committed(shard):
        raise StorageError(f"questions shard {shard!r} is not committed in {questions_uri}")
    table = ds.read_shard(shard, ["task_type", "images"])
    images = pc.fill_null(pc.list_value_length(table.column("images")), 0)
    return set(zip(table.column("task_type").to_pylist(), [n > 0 for n in images.to_pylist()], strict=True))


async def _messages(q: Mapping[str, Any]) -> list[dict[str, Any]]:
    if q.get("images"):
        return await asyncio.to_thread(build_messages, q)
    return build_messages(q)


def _expected_row(row: Mapping[str, Any], config: DistillConfig, qids: Mapping[str, bool]) -> bool:
    """Does a journal row belong to this config's sample set (not an older config's)?
    ``qids``: the shard's question ids -> whether the question has an image (its route)."""
    if row["question_id"] not in qids or not 0 <= int(row["sample_idx"]) < config.samples:
        return False
    if row["prompt_version"] != config.prompt_version:
        return False
    try:
        t = config.teacher_for(row["task_type"], qids[row["question_id"]])
    except OctomedError:
        return False
    return row["model"] == t.model and row["params_hash"] == t.params_hash()


def _records(out: str, shard: str) -> Iterable[dict[str, Any]]:
    """The shard's committed raw rows (earlier passes), then its journal: what compaction reads."""
    yield from committed_rows(out, shard)
    yield from iter_journal(out, shard)


def compact_shard(
    out: str,
    shard: str,
    config: DistillConfig,
    qids: Mapping[str, bool],
    report: ShardReport,
    started: float,
    mode: str = "delete",
    input_committed_at: float | None = None,
) -> None:
    """Committed raw rows + journal -> the raw shard: one row per expected key, a stored sample
    beating a failure.

    Streamed through the storage layer's shard writer (spilled to a local file, published
    atomically); its marker (written last) carries the shard report, ``complete`` and the config
    fingerprint: the shard's done-signal. Then the committed file is checked and the journal
    retired (``mode``): the committed shard holds every done key from then on.
    """
    done: set[str] = set()
    failures: dict[str, dict[str, Any]] = {}
    for rec in _chain_keys(out, shard):
        if rec.get("reject_reason") != FAILED and _expected_row(rec, config, qids):
            done.add(row_key(rec))
    dataset = storage.Dataset(raw_uri(out), SAMPLE_SCHEMA)
    raw = dataset.writer(shard)
    written: set[str] = set()
    for rec in _records(out, shard):
        if not _expected_row(rec, config, qids):
            continue
        key = row_key(rec)
        if rec.get("reject_reason") == FAILED:
            if key not in done:
                failures[key] = rec  # the latest failure of a key that never succeeded
            continue
        if key in written:
            continue  # a sample journalled twice (re-run raced a kill): keep the first
        written.add(key)
        rec["created_at"] = _ts(rec.get("created_at"))
        raw.add(rec)
    for rec in failures.values():
        rec["created_at"] = _ts(rec.get("created_at"))
        raw.add(rec)
    report.failed = len(failures)
    report.stored = len(written)
    report.complete = len(written) == report.expected and not failures
    report.seconds = round(time.monotonic() - started, 3)
    counts = {
        "questions": report.questions,
        "samples": report.expected,
        "stored": report.stored,
        "new_samples": report.new_samples,
        "failed": report.failed,
        "requests": report.requests,
    }
    info = raw.commit(
        {
            "fingerprint": config_fingerprint(config),
            "input_committed_at": input_committed_at,
            "samples": config.samples,
            "complete": report.complete,
            "counts": counts,
            "report": report.to_dict(),
        }
    )
    if mode != "keep" and _verified(dataset, info):
        retire(out, shard, mode)


def _chain_keys(out: str, shard: str) -> Iterable[dict[str, Any]]:
    yield from committed_rows(out, shard, KEY_COLUMNS)
    yield from iter_journal(out, shard)


def _verified(dataset: storage.Dataset, info: storage.ShardInfo) -> bool:
    """The committed file is there, whole, with the rows its marker counts (else keep the journal)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(storage.join(dataset.uri, info.file))
    try:
        if fs.size(path) != info.bytes:
            return False
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows == info.rows
    except (OSError, ValueError) as exc:
        log.warning("shard %s: committed file unreadable (%s); journal kept", info.shard, exc)
        return False


def _ts(value: Any) -> Any:
    if isinstance(value, int):
        from datetime import UTC, datetime

        return datetime.fromtimestamp(value / 1000.0, tz=UTC)
    return value


def distill_shard(
    questions_uri: str,
    shard: str,
    out: str,
    config: DistillConfig,
    *,
    api_keys: Mapping[str, str | SecretStr] | None = None,
    limiter: RateLimiter | None = None,
    progress: Any = None,
    journal: str | None = None,
) -> ShardReport:
    """Synchronous wrapper of :func:`adistill_shard` (runs its own event loop)."""
    return asyncio.run(
        adistill_shard(
            questions_uri,
            shard,
            out,
            config,
            api_keys=api_keys,
            limiter=limiter,
            progress=progress,
            journal=journal,
        )
    )
