"""The async distillation engine: N teacher samples per question, durable and resumable.

For one questions shard: stream its questions, skip every sample key the journal already holds,
and send the rest to the routed teacher through the request processor
(:class:`~octomed_data.inference.processor.RequestProcessor`: bounded in-flight requests per
teacher, rate limiter, retries with backoff that honour Retry-After, the dead-endpoint breaker,
the journal). Each finished reply (reasoning, answer text, finish reason, refusal) is journalled
and counts as done only once its segment is written; no verdict is made here (rejection sampling
is its own stage, :mod:`octomed_data.rejection`). A request that still fails after
``max_attempts`` is journalled as a failure (not done): the shard finishes anyway, reports it,
and a re-run retries exactly those. Samples routed to a ``mode: batch`` teacher go through the
Batch backend (:mod:`octomed_data.inference.batch_run`) into the same journal as the same rows.
At the end the journal is compacted into ``OUT/raw`` (:mod:`octomed_data.distill.compact`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterable, Mapping
from typing import Any

from pydantic import SecretStr

from octomed_data import storage
from octomed_data.distill.compact import (
    ShardReport,
    compact_shard,
    config_fingerprint,
    is_shard_done,
    journal_mode,
)
from octomed_data.distill.journal import FAILED, raw_uri, read_done_keys, sample_key
from octomed_data.errors import StorageError
from octomed_data.inference.batch_records import batch_dir
from octomed_data.inference.batch_run import BatchRun
from octomed_data.inference.client import EndpointClient, sample_seed
from octomed_data.inference.processor import RequestProcessor, open_clients, request_kwargs
from octomed_data.inference.ratelimit import LocalRateLimiter, RateLimiter
from octomed_data.inference.replies import read_choice
from octomed_data.inference.retry import Backoff
from octomed_data.layout import DistillFolder
from octomed_data.prompts import build_messages
from octomed_data.release_safety import SECRET_IN_REPLY, SecretGuard
from octomed_data.schema import QUESTION_SCHEMA
from octomed_data.teachers import (
    SIMULATED_LABEL,
    SIMULATED_NO_KEY,
    DistillConfig,
    TeacherConfig,
    simulated_reply,
)

__all__ = [
    "ShardReport",
    "adistill_shard",
    "compact_shard",
    "config_fingerprint",
    "distill_shard",
    "is_shard_done",
    "reply_fields",
    "reply_guard",
    "shard_routes",
]

log = logging.getLogger("octomed_data.distill")

# Question fields a reply row needs (:func:`base_row`): kept in a batch record, so a batch is
# collected after a restart without re-reading its questions.
Q_FIELDS = ("question_id", "source", "task_type", "answer")
# What a teacher (or its server) wrote into a row: scanned for the keys the shard sends.
REPLY_COLUMNS = ("reasoning", "response", "refusal", "finish_reason", "error")


@functools.lru_cache(maxsize=32)
def _guard_over(keys: tuple[tuple[str, str], ...]) -> SecretGuard:
    return SecretGuard.of_values(dict(keys))


def reply_guard(clients: Mapping[str, EndpointClient]) -> SecretGuard:
    """The key scan for what ``clients``' teachers reply: every key this shard sends (a simulated
    teacher's placeholder is no key), in every encoding :class:`SecretGuard` knows."""
    keys = {
        c.teacher.api_key_env or c.teacher.name: c.secret
        for c in clients.values()
        if c.secret and c.secret != SIMULATED_NO_KEY
    }
    return _guard_over(tuple(sorted(keys.items())))


def guard_reply_row(guard: SecretGuard, row: dict[str, Any]) -> None:
    """Scrub a teacher's key out of a reply row's texts; a row that held one is rejected as
    ``secret_in_reply`` (stored, so it is counted and never requested again, but never accepted)."""
    if not guard:
        return
    held = guard.scrub_row(row, REPLY_COLUMNS)
    if held and row.get("reject_reason") != FAILED:
        row["reject_reason"] = SECRET_IN_REPLY
        log.warning(
            "question %s sample %s: the reply held a teacher's API key (%s): scrubbed, rejected as %s",
            row.get("question_id"),
            row.get("sample_idx"),
            ", ".join(held),
            SECRET_IN_REPLY,
        )


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


def base_row(
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
    proc: RequestProcessor,
    config: DistillConfig,
    q: Mapping[str, Any],
    tc: EndpointClient,
    messages: list[dict[str, Any]],
    group: list[int],
) -> None:
    """Request samples ``group`` of one question: one request (with ``n`` when it has several)."""
    seeds = {i: sample_seed(config.seed, q["question_id"], i) for i in group}
    sent = seeds[group[0]]
    reply = await proc.request(tc, request_kwargs(tc, messages, sent, len(group)), n=len(group))
    # Rows record the seed the request carried (one for all samples of an n-request; none when
    # the teacher's seed policy is off), never a seed that was not sent.
    recorded = sent if tc.sends_seed else None
    leftover: list[int] = []
    if reply.response is None:
        now_ms = int(time.time() * 1000)
        for i in group:
            row = base_row(q, tc.teacher, config, i, recorded, tc.params_hash)
            row.update(reject_reason=FAILED, attempts=reply.attempts, error=reply.error, created_at=now_ms)
            guard_reply_row(reply_guard(proc.clients), row)  # an error text in any encoding too
            proc.add(row)
    else:
        leftover = add_reply_rows(
            proc, config, q, tc, group, reply.response, recorded, reply.attempts, reply.latency
        )
    for i in leftover:
        await _sample_group(proc, config, q, tc, messages, [i])


def add_reply_rows(
    proc: RequestProcessor,
    config: DistillConfig,
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
    # Simulated traces are never passed off as a real teacher's, whatever the config calls it.
    simulated = simulated_reply(response)
    endpoint = tc.endpoint_of(response)
    guard = reply_guard(proc.clients)
    for j, (i, choice) in enumerate(zip(group, choices, strict=False)):
        # Usage is per request: the prompt is billed once, completion split over choices.
        p_tok = (usage.prompt_tokens if usage else None) if j == 0 else 0
        c_tok = (usage.completion_tokens // len(choices)) if usage else None
        if i in skip:
            continue
        row = base_row(q, teacher, config, i, seed, tc.params_hash)
        # The replica that served it (a fleet's), else the teacher's one URL; never a key or query.
        row.update(reply_fields(choice), endpoint=endpoint)
        if simulated:
            row["teacher"] = SIMULATED_LABEL
        row.update(
            prompt_tokens=p_tok,
            completion_tokens=c_tok,
            latency_s=None if latency is None else round(latency, 4),
            attempts=attempts,
            created_at=now_ms,
            batch_id=batch_id,
        )
        proc.counters.prompt_tokens += p_tok or 0
        proc.counters.completion_tokens += c_tok or 0
        guard_reply_row(guard, row)
        proc.add(row)
    return group[len(choices) :]


def _question_batches(questions_uri: str, shard: str) -> Iterable[list[dict[str, Any]]]:
    ds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    if not ds.is_committed(shard):
        raise StorageError(f"questions shard {shard!r} is not committed in {questions_uri}")
    for batch in ds.iter_batches(batch_size=256, shards=[shard]):
        yield batch.to_pylist()


class DistillBatches:
    """Distillation's side of the Batch backend: sample keys and seeds, reply rows, online fallback."""

    def __init__(self, proc: RequestProcessor, config: DistillConfig, questions_uri: str) -> None:
        self.proc, self.config, self.questions_uri = proc, config, questions_uri
        self.version = config.prompt_version

    def key(self, q: Mapping[str, Any], model: str, version: str, params_hash: str, i: int) -> str:
        return sample_key(q["question_id"], model, version, params_hash, i)

    def seed(self, q: Mapping[str, Any], i: int) -> int:
        return sample_seed(self.config.seed, q["question_id"], i)

    def store(
        self,
        q: Mapping[str, Any],
        tc: EndpointClient,
        group: list[int],
        response: Any,
        seed: int | None,
        batch_id: str,
        skip: Container[int],
    ) -> list[int]:
        return add_reply_rows(self.proc, self.config, q, tc, group, response, seed, 1, None, batch_id, skip)

    async def fallback(self, tc: EndpointClient, wanted: list[tuple[Mapping[str, Any], list[int]]]) -> None:
        """Request what a batch lacked online, bounded like the main loop: an expired batch of 50k
        multimodal requests never holds 50k prompts (images) at once."""
        by_question: dict[str, list[int]] = {}
        for q, samples in wanted:
            by_question.setdefault(q["question_id"], []).extend(samples)

        async def works() -> AsyncIterator[Awaitable[None]]:
            for batch in _question_batches(self.questions_uri, self.proc.shard):
                for q in batch:
                    group = by_question.get(q["question_id"])
                    if not group or self.proc.abort:
                        continue
                    messages = await _messages(q)
                    for g in [group] if tc.supports_n and len(group) > 1 else [[i] for i in group]:
                        yield _sample_group(self.proc, self.config, q, tc, messages, g)

        await self.proc.fan_out(works(), 2 * tc.teacher.max_in_flight + 16)


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
    change (``mode: batch`` teachers, :mod:`octomed_data.inference.batch_run`).
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
        zero = dict.fromkeys(("new_samples", "requests", "retries", "prompt_tokens", "completion_tokens"), 0)
        report = ShardReport(**{**prior, "stored_before": prior["expected"], **zero})
        report.seconds = time.monotonic() - started
        return report
    storage.ensure_writable(out)
    storage.write_json(DistillFolder(out).config, config.public_dict())
    # Done keys: the committed raw shard (an earlier, incomplete pass) and the journal since.
    done, _ = await asyncio.to_thread(read_done_keys, out, shard)
    # Every route this shard needs, resolved before any request: an image routed to a teacher
    # that does not take images is a ConfigError here, not a failed request later.
    routes = await asyncio.to_thread(shard_routes, questions_uri, shard)
    needed = {config.teacher_for(t, image).name for t, image in routes}
    # Server kinds are detected over HTTP once per URL: off the event loop.
    clients = await asyncio.to_thread(open_clients, [config.teacher(n) for n in sorted(needed)], api_keys)
    proc = RequestProcessor(
        clients,
        limiter=limiter or LocalRateLimiter.for_teachers(config.teachers),
        max_attempts=config.max_attempts,
        backoff=Backoff(config.backoff_base_s, config.backoff_max_s),
        folder=out,
        shard=shard,
        flush_every=config.flush_every,
        flush_interval_s=config.flush_interval_s,
        progress=progress,
    ).start()
    batches = None
    if any(c.teacher.mode == "batch" for c in clients.values()) or await asyncio.to_thread(
        _has_batch_records, out, shard
    ):
        batches = BatchRun(proc, DistillBatches(proc, config, questions_uri), on_batch_state)
    qids: dict[str, bool] = {}  # question id -> has an image (decides its route)

    async def works() -> AsyncIterator[Awaitable[None]]:
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
                if not pending or proc.abort:
                    continue
                messages = await _messages(q)
                if batches is not None and t.mode == "batch":
                    payload = {k: q[k] for k in Q_FIELDS}
                    await batches.add(q["question_id"], payload, tc, messages, pending)
                    continue
                for group in [pending] if tc.supports_n and len(pending) > 1 else [[i] for i in pending]:
                    yield _sample_group(proc, config, q, tc, messages, group)
        if batches is not None:
            await batches.flush()
            yield batches.collect(done)  # polls while online requests run

    try:
        await proc.fan_out(works(), proc.queue_limit())
    finally:
        await proc.close()
        if batches is not None:
            await batches.close()
    if batches is not None:
        await batches.finish()  # their rows are durable now: the batches are collected
        report.batches, report.batches_resumed = batches.submitted, batches.resumed
        report.batch_requests, report.batch_samples = batches.requests, batches.collected
        report.batch_fallback, report.batch_state = batches.fell_back, batches.summary()
    c = proc.counters
    report.new_samples = c.stored
    report.requests, report.retries = c.requests, c.retries
    report.prompt_tokens, report.completion_tokens = c.prompt_tokens, c.completion_tokens
    report.aborted = proc.abort
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
    return bool(storage.list_files(batch_dir(out, shard), ".json"))


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
