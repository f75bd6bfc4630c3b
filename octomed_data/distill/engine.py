"""The async distillation engine: N teacher samples per question, durable and resumable.

For one questions shard: stream its questions, skip every sample key the journal already holds,
send the rest to the routed teacher with bounded in-flight requests (one semaphore per teacher),
a per-request timeout, a rate limiter, and retries with exponential backoff + jitter that honour
Retry-After. Each finished sample is verified (:mod:`octomed_data.answers`), appended to the
journal and counts as done only once its journal segment is written. A request that still fails
after ``max_attempts`` is journalled as a failure (not done): the shard finishes anyway, reports
it, and a re-run retries exactly those. At the end the journal is compacted into ``OUT/raw`` and
``OUT/accepted`` (same shard name as the questions shard), and a done marker is written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import openai
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import SecretStr

from octomed_data import storage
from octomed_data.answers import extract_answer, is_correct, looks_like_refusal
from octomed_data.distill.journal import (
    FAILED,
    JournalWriter,
    iter_journal,
    read_done_keys,
    row_key,
    sample_key,
)
from octomed_data.errors import OctomedError, StorageError
from octomed_data.inference.ratelimit import LocalRateLimiter, RateLimiter
from octomed_data.inference.replies import read_choice
from octomed_data.inference.servers import ServerKind, detect_kind, profile
from octomed_data.prompts import build_messages
from octomed_data.sandbox import SANDBOX_FINGERPRINT, SANDBOX_TEACHER
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, TaskType, options_of
from octomed_data.teachers import DistillConfig, TeacherConfig, resolve_api_key

log = logging.getLogger("octomed_data.distill")

RAW_DIR = "raw"
ACCEPTED_DIR = "accepted"
STATE_DIR = "_distill"
_RETRYABLE_STATUS = {408, 409, 425, 429}
# Key-shaped: a key prefix, then a long run holding a digit ("sk-proj-3f9...", "api_0123..."); prose
# such as "key-shaped" or "api_key_env" is not.
_KEYLIKE = re.compile(r"\b(?:sk|key|api)[-_](?=[A-Za-z_\-*]*\d)[A-Za-z0-9_\-*]{10,}", re.IGNORECASE)
# A server's error is kept whole (the cause is often on its last line), on one line, bounded.
MAX_ERROR_CHARS = 600


class TeacherUnreachable(OctomedError):
    """Every request to a teacher failed and none succeeded: a config or service problem."""


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
    accepted: int = 0  # accepted rows in the compacted shard
    rejected: dict[str, int] = field(default_factory=dict)  # reject reason -> rows
    requests: int = 0  # HTTP requests sent by this run (attempts)
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    complete: bool = False  # every expected sample is stored (no failures left)
    aborted: str | None = None  # why the run stopped early (teacher unreachable)
    seconds: float = 0.0
    raw_uri: str = ""
    accepted_uri: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def raw_uri(out: str) -> str:
    return storage.join(out, RAW_DIR)


def accepted_uri(out: str) -> str:
    return storage.join(out, ACCEPTED_DIR)


def _done_marker(out: str, shard: str) -> str:
    return storage.join(out, STATE_DIR, "done", f"{shard}.json")


def config_fingerprint(config: DistillConfig) -> str:
    """What decides which samples a shard needs: samples, prompt version, teachers' model + params."""
    parts = {
        "samples": config.samples,
        "prompt_version": config.prompt_version,
        "seed": config.seed,
        "routing": {t.value: _route_id(config, t) for t in TaskType},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _route_id(config: DistillConfig, task: TaskType) -> str | None:
    try:
        t = config.teacher_for(task)
    except OctomedError:
        return None
    return f"{t.name}|{t.model}|{t.params_hash()}"


def is_shard_done(out: str, shard: str, config: DistillConfig | None = None) -> bool:
    """True when ``shard`` was distilled completely (with ``config``, when given) and compacted."""
    uri = _done_marker(out, shard)
    if not storage.exists(uri):
        return False
    marker = storage.read_json(uri)
    if not marker.get("complete"):
        return False
    if config is not None and marker.get("fingerprint") != config_fingerprint(config):
        return False
    # The marker alone is not enough: outputs deleted by hand are rebuilt from the journal.
    return all(storage.Dataset(uri_of(out)).is_committed(shard) for uri_of in (raw_uri, accepted_uri))


def sample_seed(base: int, question_id: str, sample_idx: int) -> int:
    """Per-sample seed: stable across runs, different for every (question, sample)."""
    digest = hashlib.blake2b(f"{base}|{question_id}|{sample_idx}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Remove keys (and anything key-shaped) from an error message before it is stored or logged.

    A key is replaced where it stands as a token of its own, never inside a longer word: a short
    placeholder key must not turn ``max_tokens`` into ``ma***_tokens``.
    """
    for s in secrets:
        if s:
            text = re.sub(rf"(?<![A-Za-z0-9_\-]){re.escape(s)}(?![A-Za-z0-9_\-])", "***", text)
    return _KEYLIKE.sub("***", text)


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Collapse a (server's) message to one line of at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None


class _Failure(Exception):
    def __init__(self, message: str, retryable: bool, delay: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.delay = delay


def _classify(exc: BaseException) -> _Failure:
    """Map a client exception to retryable or not (auth / bad request are not)."""
    if isinstance(exc, openai.RateLimitError):
        return _Failure("rate limited (429)", True, _retry_after(exc))
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        retryable = code in _RETRYABLE_STATUS or code >= 500
        return _Failure(f"HTTP {code}: {one_line(str(exc))}", retryable, _retry_after(exc))
    if isinstance(exc, openai.APITimeoutError):
        return _Failure("request timed out", True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f" ({type(cause).__name__})" if cause is not None else ""
        return _Failure(f"connection error{detail}", True)
    if isinstance(exc, (ValueError, openai.APIResponseValidationError, KeyError, TypeError, AttributeError)):
        return _Failure(f"malformed response: {type(exc).__name__}", True)
    if isinstance(exc, asyncio.TimeoutError):
        return _Failure("request timed out", True)
    return _Failure(f"{type(exc).__name__}: {one_line(str(exc), 300)}", True)


class _TeacherClient:
    """One teacher's client, concurrency bound, failure breaker, and what its server accepts."""

    def __init__(self, teacher: TeacherConfig, key: SecretStr, kind: ServerKind | None = None) -> None:
        self.teacher = teacher
        self._key = key
        self.kind = kind or detect_kind(teacher.base_url, key.get_secret_value(), teacher.server)
        self.profile = profile(self.kind)
        self.supports_n = teacher.supports_n if teacher.supports_n is not None else self.profile.honours_n
        self.sends_seed = teacher.seed_policy == "per_sample" and self.profile.accepts_seed
        self.client = openai.AsyncOpenAI(
            api_key=key.get_secret_value(),
            base_url=teacher.base_url,
            max_retries=0,  # the engine retries, counting attempts and honouring Retry-After
            timeout=teacher.timeout_s,
        )
        self.slots = asyncio.Semaphore(teacher.max_in_flight)
        self.params_hash = teacher.params_hash()
        self.successes = 0
        self.final_failures = 0
        self.last_error: str | None = None
        self.last_attempts = 0
        self.avg_completion = float(min(teacher.max_tokens, 1024))

    @property
    def secret(self) -> str:
        return self._key.get_secret_value()

    def unreachable(self, threshold: int) -> bool:
        return self.successes == 0 and self.final_failures >= threshold

    def request_fields(
        self, seed: int | None, n: int, extra_body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The optional request fields this server accepts: seed, n, neutral sampling + ``extra_body``
        (the teacher's own when not given)."""
        neutral = self.profile.neutral_sampling
        if extra_body is None:
            extra_body = self.teacher.extra_body
        else:
            neutral = {}  # a caller's resolved extras are complete (eval's sampling_extras: off)
        fields: dict[str, Any] = {}
        if seed is not None and self.sends_seed:
            fields["seed"] = seed
        if n > 1:
            fields["n"] = n
        # The user's extra_body wins over the neutral values (e.g. a deliberate top_k).
        extra = {**neutral, **(extra_body or {})}
        if extra:
            fields["extra_body"] = extra
        return fields

    async def close(self) -> None:
        await self.client.close()


@dataclass
class _Counters:
    new: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Run:
    """State of one shard run (kept out of the public API)."""

    def __init__(
        self,
        config: DistillConfig,
        out: str,
        shard: str,
        clients: Mapping[str, _TeacherClient],
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
        self.abort: str | None = None
        self.breaker = 8

    def _durable(self, stored: int, failed: int) -> None:
        # Done means durable: samples count once the journal segment holding them is written.
        self.counters.new += stored
        self.counters.failed += failed
        if self.progress is not None and stored:
            self.progress.update(stored)

    def _backoff(self, attempt: int, hint: float | None) -> float:
        cfg = self.config
        if hint is not None:
            return min(hint, max(cfg.backoff_max_s, hint)) * (1.0 + 0.1 * random.random())
        base = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** (attempt - 1)))
        return base * (0.5 + random.random())  # full-ish jitter: spread synchronized retries

    async def request(
        self, tc: _TeacherClient, messages: list[dict[str, Any]], seed: int, n: int, prompt_chars: int
    ) -> tuple[Any | None, int, float, str | None]:
        """(response or None, attempts, latency of the successful attempt, last error)."""
        teacher = tc.teacher
        kwargs: dict[str, Any] = {
            "model": teacher.model,
            "messages": messages,
            "temperature": teacher.temperature,
            "top_p": teacher.top_p,
            "max_tokens": teacher.max_tokens,
            **tc.request_fields(seed, n),
        }

        def attempted(attempt: int) -> None:
            self.counters.requests += 1
            if attempt > 1:
                self.counters.retries += 1

        stopped = False

        def should_stop() -> str | None:
            nonlocal stopped
            stopped = stopped or bool(self.abort)
            return self.abort

        response, attempts, latency, last_error = await request_with_retries(
            tc,
            kwargs,
            max_attempts=self.config.max_attempts,
            backoff=self._backoff,
            limiter=self.limiter,
            estimate=prompt_chars // 4 + int(tc.avg_completion) * n,
            n=n,
            sleep=self.sleep,
            stop=should_stop,
            on_attempt=attempted,
        )
        if response is not None:
            return response, attempts, latency, None
        if stopped:
            return None, attempts, 0.0, last_error  # stopped by the breaker, not a failure of its own
        tc.final_failures += 1
        tc.last_error = last_error
        tc.last_attempts = attempts
        if tc.unreachable(self.breaker) and not self.abort:
            tries = "attempt" if attempts == 1 else "attempts"
            self.abort = (
                f"teacher {teacher.name!r} at {teacher.base_url}: {tc.final_failures} samples failed "
                f"(the last after {attempts} {tries}) and none succeeded; last error: {last_error}"
            )
        return None, attempts, 0.0, last_error


async def request_with_retries(
    tc: _TeacherClient,
    kwargs: dict[str, Any],
    *,
    max_attempts: int,
    backoff: Callable[[int, float | None], float],
    limiter: RateLimiter,
    estimate: int,
    n: int = 1,
    sleep: Callable[[float], Any] = asyncio.sleep,
    stop: Callable[[], str | None] = lambda: None,
    on_attempt: Callable[[int], None] | None = None,
) -> tuple[Any | None, int, float, str | None]:
    """One chat-completions call with retries: THE request path (distillation, grading, evaluation).

    Every attempt waits for the rate limiter, is bounded end to end by the teacher's timeout, and a
    failure is classified (retryable or not, Retry-After honoured through ``backoff``). Returns
    (response or None, attempts made, latency of the successful attempt, last error with secrets
    scrubbed). ``stop()`` returning a message ends the retries early with that message.
    """
    teacher = tc.teacher
    last_error: str | None = None
    for attempt in range(1, max_attempts + 1):
        reason = stop()
        if reason:
            return None, attempt - 1, 0.0, last_error or reason
        await limiter.acquire(teacher.name, estimate)
        if on_attempt is not None:
            on_attempt(attempt)
        started = time.monotonic()
        try:
            # The client's timeout bounds each read, not the whole reply: a server that
            # trickles bytes could hold a slot for ever. This bounds the request end to end.
            response = await asyncio.wait_for(tc.client.chat.completions.create(**kwargs), teacher.timeout_s)
            if not getattr(response, "choices", None):
                raise ValueError("response has no choices")
        except Exception as exc:  # every client-side failure is classified, none escapes
            failure = _classify(exc)
            last_error = scrub(str(failure), [tc.secret])
            limiter.record_usage(teacher.name, estimate, 0)
            if not failure.retryable or attempt == max_attempts:
                return None, attempt, 0.0, last_error
            await sleep(backoff(attempt, failure.delay))
            continue
        latency = time.monotonic() - started
        usage = getattr(response, "usage", None)
        used = (usage.prompt_tokens + usage.completion_tokens) if usage else estimate
        limiter.record_usage(teacher.name, estimate, used)
        if usage and usage.completion_tokens:
            tc.avg_completion = 0.9 * tc.avg_completion + 0.1 * usage.completion_tokens / n
        tc.successes += 1
        return response, attempt, latency, None
    return None, max_attempts, 0.0, last_error


def _verdict(choice: Any, task: TaskType, options: list[tuple[str, str]], gold: str) -> dict[str, Any]:
    msg = choice.message
    reply = read_choice(choice)
    reasoning, response = reply.reasoning, reply.answer
    finish = choice.finish_reason
    refusal = getattr(msg, "refusal", None)
    extracted = None
    method = None
    if finish == "length":
        reject = "truncated"
    elif refusal or finish == "content_filter":
        reject = "refusal"
    else:
        ex = extract_answer(response, task, options)
        extracted, method = ex.answer, ex.method
        if ex.answer is None:
            reject = "refusal" if looks_like_refusal(response) else (ex.reason or "no_answer")
        elif is_correct(ex.answer, gold, task):
            reject = None
        else:
            reject = "wrong_answer"
    return {
        "reasoning": reasoning,
        "response": response if response else (refusal or None),
        "extracted_answer": extracted,
        "extraction_method": method,
        "correct": reject is None,
        "finish_reason": finish,
        "reject_reason": reject,
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
    run: _Run, q: Mapping[str, Any], tc: _TeacherClient, messages: list[dict[str, Any]], group: list[int]
) -> None:
    """Request samples ``group`` of one question: one request (with ``n`` when it has several)."""
    teacher = tc.teacher
    task = TaskType(q["task_type"])
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
            row.update(correct=False, reject_reason=FAILED, attempts=attempts, error=error, created_at=now_ms)
            run.journal.add(row)
    else:
        options = options_of(q)
        usage = getattr(response, "usage", None)
        choices = list(response.choices)[: len(group)]
        # Sandbox traces are never passed off as a real teacher's, whatever the config calls it.
        sandbox = getattr(response, "system_fingerprint", None) == SANDBOX_FINGERPRINT
        for j, (i, choice) in enumerate(zip(group, choices, strict=False)):
            row = _base_row(q, teacher, run.config, i, recorded[i], tc.params_hash)
            row.update(_verdict(choice, task, options, q["answer"]))
            if sandbox:
                row["teacher"] = SANDBOX_TEACHER
            # Usage is per request: the prompt is billed once, completion split over choices.
            p_tok = (usage.prompt_tokens if usage else None) if j == 0 else 0
            c_tok = (usage.completion_tokens // len(choices)) if usage else None
            row.update(
                prompt_tokens=p_tok,
                completion_tokens=c_tok,
                latency_s=round(latency, 4),
                attempts=attempts,
                created_at=now_ms,
            )
            run.counters.prompt_tokens += p_tok or 0
            run.counters.completion_tokens += c_tok or 0
            run.journal.add(row)
        leftover = group[len(choices) :]  # a server that returned fewer choices than asked
    for i in leftover:
        await _sample_group(run, q, tc, messages, [i])


def _open_clients(
    config: DistillConfig, api_keys: Mapping[str, str | SecretStr] | None, needed: Iterable[str]
) -> dict[str, _TeacherClient]:
    return {
        name: _TeacherClient(config.teacher(name), resolve_api_key(config.teacher(name), api_keys))
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
) -> ShardReport:
    """Distill one questions shard into ``OUT/raw`` and ``OUT/accepted`` (resumable, idempotent).

    ``api_keys`` maps teacher name -> key (from a secret block); otherwise each teacher's env
    variable is read. ``limiter`` defaults to an in-process per-teacher budget. ``progress`` is
    anything with ``update(n)`` (a tqdm bar), called once per durable sample.
    """
    started = time.monotonic()
    shard = storage.Dataset.shard_name(shard)
    report = ShardReport(shard=shard, raw_uri=raw_uri(out), accepted_uri=accepted_uri(out))
    if is_shard_done(out, shard, config):
        marker = storage.read_json(_done_marker(out, shard))
        prior = marker["report"]
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
    done, _ = await asyncio.to_thread(read_done_keys, out, shard)
    report.stored_before = 0
    needed = {config.teacher_for(t).name for t in _task_types_needed(config)}
    # Server kinds are detected over HTTP once per URL: off the event loop.
    clients = await asyncio.to_thread(_open_clients, config, api_keys, needed)
    limiter = limiter or LocalRateLimiter.for_teachers(config.teachers)
    run = _Run(config, out, shard, clients, limiter, progress)
    run.journal.start()
    tasks: set[asyncio.Task[None]] = set()
    qids: set[str] = set()
    # Tasks beyond the in-flight bound wait on a semaphore; keep a small queue of them, no more.
    limit = 2 * sum(c.teacher.max_in_flight for c in clients.values()) + 16
    try:
        for batch in _question_batches(questions_uri, shard):
            for q in batch:
                qids.add(q["question_id"])
                report.questions += 1
                report.expected += config.samples
                tc = clients[config.teacher_for(q["task_type"]).name]
                t = tc.teacher
                pending = []
                for i in range(config.samples):
                    key = sample_key(q["question_id"], t.model, config.prompt_version, tc.params_hash, i)
                    if key in done:
                        report.stored_before += 1
                    else:
                        pending.append(i)
                if progress is not None and len(pending) < config.samples:
                    progress.update(config.samples - len(pending))
                if not pending or run.abort:
                    continue
                messages = await _messages(q)
                groups = [pending] if tc.supports_n and len(pending) > 1 else [[i] for i in pending]
                for group in groups:
                    # Bound the work in flight: wait for a slot before creating more tasks.
                    while len(tasks) >= limit:
                        finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        _raise_failed(finished)
                    tasks.add(asyncio.create_task(_sample_group(run, q, tc, messages, group)))
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
    c = run.counters
    report.new_samples = c.new
    report.requests, report.retries = c.requests, c.retries
    report.prompt_tokens, report.completion_tokens = c.prompt_tokens, c.completion_tokens
    report.aborted = run.abort
    await asyncio.to_thread(_compact, out, shard, config, qids, report)
    report.seconds = round(time.monotonic() - started, 3)
    storage.write_json(
        _done_marker(out, shard),
        {"complete": report.complete, "fingerprint": config_fingerprint(config), "report": report.to_dict()},
    )
    log.info(
        "shard %s: %d questions, %d/%d samples stored (%d new, %d failed), %d accepted, %d requests",
        shard,
        report.questions,
        report.expected - report.failed,
        report.expected,
        report.new_samples,
        report.failed,
        report.accepted,
        report.requests,
    )
    return report


def _raise_failed(tasks: set[asyncio.Task[None]]) -> None:
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


def _task_types_needed(config: DistillConfig) -> list[TaskType]:
    out = []
    for t in TaskType:
        try:
            config.teacher_for(t)
            out.append(t)
        except OctomedError:
            continue
    return out


async def _messages(q: Mapping[str, Any]) -> list[dict[str, Any]]:
    if q.get("images"):
        return await asyncio.to_thread(build_messages, q)
    return build_messages(q)


def _expected_row(row: Mapping[str, Any], config: DistillConfig, qids: set[str]) -> bool:
    """Does a journal row belong to this config's sample set (not an older config's)?"""
    if row["question_id"] not in qids or not 0 <= int(row["sample_idx"]) < config.samples:
        return False
    if row["prompt_version"] != config.prompt_version:
        return False
    try:
        t = config.teacher_for(row["task_type"])
    except OctomedError:
        return False
    return row["model"] == t.model and row["params_hash"] == t.params_hash()


class _ShardWriter:
    """Streams rows into an in-memory Parquet file in row groups, then commits it as a shard."""

    def __init__(self, uri: str, rows_per_group: int = 2048, schema: pa.Schema = SAMPLE_SCHEMA) -> None:
        self.schema = schema
        self.ds = storage.Dataset(uri, schema)
        self.sink = pa.BufferOutputStream()
        self.writer = pq.ParquetWriter(self.sink, schema, compression="zstd")
        self.buffer: list[dict[str, Any]] = []
        self.rows = 0
        self.per_group = rows_per_group

    def add(self, row: Mapping[str, Any]) -> None:
        self.buffer.append({f.name: row.get(f.name) for f in self.schema})
        if len(self.buffer) >= self.per_group:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.rows += len(self.buffer)
            self.buffer = []

    def commit(self, shard: str, extra: Mapping[str, Any]) -> None:
        self._flush()
        self.writer.close()
        payload = self.sink.getvalue().to_pybytes()
        # Same two-step commit as Dataset.write_shard (file, then manifest marker), streamed.
        storage.write_bytes(self.ds.file_uri(shard), payload)
        info = storage.ShardInfo(
            shard=shard,
            file=f"part-{shard}.parquet",
            rows=self.rows,
            bytes=len(payload),
            committed_at=time.time(),
            extra=dict(extra),
        )
        storage.write_json(self.ds.marker_uri(shard), asdict(info))


def _compact(out: str, shard: str, config: DistillConfig, qids: set[str], report: ShardReport) -> None:
    """Journal -> raw + accepted shards: one row per expected key, a stored sample beating a failure."""
    done: set[str] = set()
    failures: dict[str, dict[str, Any]] = {}
    for rec in iter_journal(out, shard):
        if rec.get("reject_reason") != FAILED and _expected_row(rec, config, qids):
            done.add(row_key(rec))
    raw = _ShardWriter(raw_uri(out))
    acc = _ShardWriter(accepted_uri(out))
    written: set[str] = set()
    rejected: Counter[str] = Counter()
    for rec in iter_journal(out, shard):
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
        if rec["correct"]:
            acc.add(rec)
        else:
            rejected[rec["reject_reason"] or "unknown"] += 1
    for rec in failures.values():
        rec["created_at"] = _ts(rec.get("created_at"))
        raw.add(rec)
        rejected[FAILED] += 1
    extra = {"fingerprint": config_fingerprint(config), "samples": config.samples}
    raw.commit(shard, extra)
    acc.commit(shard, extra)
    report.accepted = acc.rows
    report.rejected = dict(sorted(rejected.items()))
    report.failed = len(failures)
    report.stored = len(written)
    report.complete = len(written) == report.expected and not failures


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
) -> ShardReport:
    """Synchronous wrapper of :func:`adistill_shard` (runs its own event loop)."""
    return asyncio.run(
        adistill_shard(
            questions_uri, shard, out, config, api_keys=api_keys, limiter=limiter, progress=progress
        )
    )
