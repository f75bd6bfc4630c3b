"""Batch mode: a shard's samples for a ``mode: batch`` teacher go through the Batch API.

The engine (:func:`octomed_data.distill.engine.adistill_shard`) hands every pending sample group
of a batch-mode teacher to :class:`BatchRun` instead of sending it. Per shard and teacher, the
requests (the same bodies online requests carry, :func:`~octomed_data.distill.engine.request_kwargs`)
are written to a local JSONL, uploaded, and submitted as batches of at most
``batch_max_requests`` requests / ``batch_max_bytes``; then polled every ``batch_poll_s`` and
collected. Replies become rows through the engine's one row builder
(:func:`~octomed_data.distill.engine.add_reply_rows`) with ``batch_id`` filled in, into the same
journal, so a sample is the same row whichever way it came.

Every batch is journalled as ``OUT/_batches/<shard>/<record>.json`` through the storage layer:
its teacher, the sample keys it holds, the input file, then the batch id. The record is written
*before* the create call (state ``submitting``) and again with the batch id (``submitted``): a
run killed at any point finds its batches on restart, adopting a batch whose create answer it
never saw (looked up by input file), and never submits a key that is in a live batch again.
Expired, failed or cancelled batches, and requests answered with an error, fall back to online
requests for exactly the samples without a reply. Records are marked ``collected`` once the
rows they gave are in the durable journal.

Servers that ignore ``n`` in batches (one choice for a request asking several; some providers'
batch endpoints do, even where their online endpoint honours ``n``) are detected from the batch
output: the samples a reply lacked are batched again as one request per sample (their request
bodies read back from the batch's input file), never silently sent online at the online price.
What a teacher does with ``n`` is remembered in ``OUT/_batches/_teachers/<teacher>.json``
(:func:`batch_n_support`), so later batches of that teacher are split up front, and
``--estimate`` (:func:`batch_estimate`) projects the requests that will really be batched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import SecretStr

from octomed_data import storage
from octomed_data.distill.engine import ShardRun, add_reply_rows, request_kwargs
from octomed_data.distill.journal import sample_key
from octomed_data.inference.batch_api import CHAT_ENDPOINT, TERMINAL, BatchAPI, BatchAPIError
from octomed_data.inference.client import EndpointClient, sample_seed
from octomed_data.inference.fleet import public_url
from octomed_data.inference.transport_http import Fields, completion_fields
from octomed_data.teachers import DistillConfig, TeacherConfig

log = logging.getLogger("octomed_data.distill.batch")

BATCH_DIR = "_batches"
SUBMITTING, SUBMITTED, COLLECTED = "submitting", "submitted", "collected"
CREATE_FAILED = "create_failed"  # the create call was refused: the samples go online
# Question fields a reply row needs (engine._base_row): kept in the record, so a batch is
# collected after a restart without re-reading its questions.
Q_FIELDS = ("question_id", "source", "task_type", "answer")
# Samples the online fallback should send: teacher client -> question id -> sample indices.
Fallback = Callable[[EndpointClient, dict[str, list[int]]], Awaitable[None]]
# What a teacher's batches do with ``n`` (OUT/_batches/_teachers/<teacher>.json).
TEACHERS_DIR = "_teachers"
N_IGNORED, N_HONOURED = "ignored", "honoured"


def n_support_uri(out: str, teacher: str) -> str:
    """Where what a teacher's batches do with ``n`` is remembered."""
    return storage.join(out, BATCH_DIR, TEACHERS_DIR, f"{teacher}.json")


def batch_n_support(out: str | None, teacher: TeacherConfig) -> str | None:
    """``"ignored"`` or ``"honoured"``: what the teacher's batch endpoint was seen to do with
    ``n`` in this output folder; None when unknown (never seen, or seen for another endpoint/model)."""
    if out is None:
        return None
    uri = n_support_uri(out, teacher.name)
    if not storage.exists(uri):
        return None
    doc = storage.read_json(uri)
    if doc.get("model") != teacher.model or doc.get("base_url") != public_url(teacher.base_url):
        return None
    n = doc.get("n")
    return n if n in (N_IGNORED, N_HONOURED) else None


def batch_dir(out: str, shard: str) -> str:
    """Where a shard's batch records live: ``OUT/_batches/<shard>``."""
    return storage.join(out, BATCH_DIR, shard)


def read_records(out: str, shard: str) -> list[dict[str, Any]]:
    """Every batch record of a shard, oldest first (names start with a time stamp)."""
    return [storage.read_json(u) for u in sorted(storage.list_files(batch_dir(out, shard), ".json"))]


def record_keys(rec: Mapping[str, Any]) -> list[str]:
    """The sample keys a batch record holds."""
    return [
        sample_key(r["q"]["question_id"], rec["model"], rec["prompt_version"], rec["params_hash"], i)
        for r in rec["requests"]
        for i in r["samples"]
    ]


@dataclass
class _Chunk:
    """Requests for one teacher being written to a local JSONL (the next batch's input file)."""

    path: str
    fh: Any
    requests: list[dict[str, Any]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    bytes: int = 0
    split_from: str | None = None  # the record whose samples it batches again, one per request


class BatchRun:
    """One shard's batches: submit pending groups, resume earlier runs' batches, poll, collect."""

    def __init__(
        self,
        run: ShardRun,
        clients: Mapping[str, EndpointClient],
        fallback: Fallback,
        on_state: Callable[[str], Any] | None = None,
    ) -> None:
        self.run = run
        self.clients = clients
        self.fallback = fallback
        self.on_state = on_state
        self.records: dict[str, dict[str, Any]] = {}  # this run's batches (resumed and new)
        self.live: set[str] = set()  # sample keys in batches that are not collected yet
        self.apis: dict[str, BatchAPI] = {}
        self._chunks: dict[str, _Chunk] = {}
        self._done_records: list[dict[str, Any]] = []
        self._published: str | None = None
        self.submitted = 0  # batches created by this run
        self.resumed = 0  # live batches of earlier runs picked up
        self.requests = 0  # request lines this run put into batches
        self.collected = 0  # samples stored from batch output
        self.fell_back = 0  # samples sent online because their batch gave no reply
        self.split = 0  # samples batched again one per request: their n-request got fewer choices
        self.n_support: dict[str, str | None] = {}  # teacher -> what its batches do with n
        self._splitting: str | None = None  # the record :meth:`_split` queues requests for

    def api(self, teacher: str) -> BatchAPI:
        if teacher not in self.apis:
            tc = self.clients[teacher]
            t = tc.teacher
            self.apis[teacher] = BatchAPI(
                t.base_url,
                SecretStr(tc.secret),
                timeout_s=t.timeout_s,
                max_attempts=self.run.config.max_attempts,
                backoff=self.run.backoff,
                sleep=self.run.sleep,
            )
        return self.apis[teacher]

    async def load(self) -> None:
        """Pick up earlier runs' batches that were not collected (a crash, a restarted flow)."""
        records = await asyncio.to_thread(read_records, self.run.out, self.run.shard)
        for rec in records:
            if rec["state"] == COLLECTED:
                continue
            if rec["teacher"] not in self.clients:
                log.warning(
                    "shard %s: batch record %s of teacher %r not collected: the teacher is no longer routed",
                    self.run.shard,
                    rec["name"],
                    rec["teacher"],
                )
                continue
            if rec["state"] == SUBMITTING:
                # The create call may have reached the server: adopt its batch, never pay twice.
                found = await self.api(rec["teacher"]).find(rec["input_file_id"])
                if found is not None:
                    await self._submitted(rec, found)
                elif self.clients[rec["teacher"]].teacher.mode != "batch":
                    # Switched to online meanwhile: no batch is created; its samples go online.
                    await self._create_failed(rec, "the teacher is no longer in batch mode")
                else:
                    await self._create(rec)
            self.records[rec["name"]] = rec
            self.live.update(record_keys(rec))
            self.resumed += 1
        await self.publish()

    async def n_ignored(self, tc: EndpointClient) -> bool:
        """True when the teacher's batches are known to ignore ``n`` (its requests are split)."""
        name = tc.teacher.name
        if name not in self.n_support:
            known = await asyncio.to_thread(batch_n_support, self.run.out, tc.teacher)
            self.n_support[name] = known
            if known == N_IGNORED and tc.supports_n:
                log.info(
                    "shard %s: teacher %s ignores n in batches (%s): one batch request per sample",
                    self.run.shard,
                    name,
                    n_support_uri(self.run.out, name),
                )
        return self.n_support[name] == N_IGNORED

    async def add(
        self, q: Mapping[str, Any], tc: EndpointClient, messages: list[dict[str, Any]], pending: list[int]
    ) -> None:
        """Queue samples ``pending`` of ``q`` for the teacher's next batch (submitted when full)."""
        together = tc.supports_n and len(pending) > 1 and not await self.n_ignored(tc)
        for group in [pending] if together else [[i] for i in pending]:
            seed = sample_seed(self.run.config.seed, q["question_id"], group[0])
            await self._queue(tc, q, group, request_kwargs(tc, messages, seed, len(group)), seed)

    async def _queue(
        self, tc: EndpointClient, q: Mapping[str, Any], group: list[int], body: dict[str, Any], seed: int
    ) -> None:
        """Write one request (samples ``group`` of ``q``) into the teacher's next batch."""
        t = tc.teacher
        body.update(body.pop("extra_body", None) or {})  # top level, as the chat transport sends it
        cid = f"{q['question_id']}|{','.join(map(str, group))}"
        line = orjson.dumps({"custom_id": cid, "method": "POST", "url": CHAT_ENDPOINT, "body": body})
        chunk = self._chunks.get(t.name)
        if chunk is not None and (
            len(chunk.requests) >= t.batch_max_requests
            or chunk.bytes + len(line) + 1 > t.batch_max_bytes
            or cid in chunk.ids
            or chunk.split_from != self._splitting
        ):
            await self._submit(tc, chunk)
            chunk = None
        if chunk is None:
            fd, path = tempfile.mkstemp(prefix="octomed-batch-in-", suffix=".jsonl")
            chunk = self._chunks[t.name] = _Chunk(path, os.fdopen(fd, "wb"), split_from=self._splitting)
        chunk.fh.write(line + b"\n")
        chunk.bytes += len(line) + 1
        chunk.ids.add(cid)
        chunk.requests.append(
            {
                "id": cid,
                "q": {k: q[k] for k in Q_FIELDS},
                "samples": group,
                # The seed the request carries (none when the teacher's seed policy is off).
                "seed": seed if tc.sends_seed else None,
            }
        )

    async def flush(self) -> None:
        """Submit every partly filled batch (the shard's questions are all queued)."""
        for name, chunk in list(self._chunks.items()):
            await self._submit(self.clients[name], chunk)

    async def _submit(self, tc: EndpointClient, chunk: _Chunk) -> None:
        t = tc.teacher
        self._chunks.pop(t.name, None)
        chunk.fh.close()
        try:
            shard = self.run.shard
            uploaded = await self.api(t.name).upload(chunk.path, filename=f"{shard}-{t.name}.jsonl")
        finally:
            os.unlink(chunk.path)
        rec = {
            "name": f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}",
            "shard": self.run.shard,
            "teacher": t.name,
            "model": t.model,
            "prompt_version": self.run.config.prompt_version,
            "params_hash": tc.params_hash,
            "state": SUBMITTING,
            "input_file_id": uploaded["id"],
            "batch_id": None,
            "status": None,
            "requests": chunk.requests,
            "created_at": time.time(),
        }
        if chunk.split_from is not None:
            rec["split_from"] = chunk.split_from
        await self._save(rec)  # before the create call: a crash during it is found on restart
        self.records[rec["name"]] = rec
        self.live.update(record_keys(rec))
        self.requests += len(chunk.requests)
        await self._create(rec)
        self.submitted += 1
        await self.publish()

    async def _create(self, rec: dict[str, Any]) -> None:
        t: TeacherConfig = self.clients[rec["teacher"]].teacher
        meta = {"octomed_shard": rec["shard"], "octomed_record": rec["name"]}
        try:
            batch = await self.api(t.name).create(rec["input_file_id"], t.batch_completion_window, meta)
        except BatchAPIError as exc:  # refused (4xx: quota, bad file) or unreachable after retries
            await self._create_failed(rec, str(exc))
            return
        await self._submitted(rec, batch)

    async def _create_failed(self, rec: dict[str, Any], why: str) -> None:
        """No batch for this record: it ends like an expired batch with no output (its samples go
        online when collected), instead of blocking the shard on every later run."""
        rec.update(state=SUBMITTED, batch_id=None, status=CREATE_FAILED, error=why)
        await self._save(rec)
        log.warning(
            "shard %s: batch for %d requests not created (%s); they go online",
            rec["shard"],
            len(rec["requests"]),
            why,
        )

    async def _submitted(self, rec: dict[str, Any], batch: Mapping[str, Any]) -> None:
        rec.update(state=SUBMITTED, batch_id=batch["id"], status=batch.get("status"))
        await self._save(rec)
        log.info(
            "shard %s: batch %s (%d requests) %s",
            rec["shard"],
            rec["batch_id"],
            len(rec["requests"]),
            rec["status"],
        )

    async def _save(self, rec: Mapping[str, Any]) -> None:
        uri = storage.join(batch_dir(self.run.out, self.run.shard), f"{rec['name']}.json")

        def write() -> None:
            storage.check_fence(uri)  # a writer that lost the shard's lease stops here
            storage.write_json(uri, rec)

        await asyncio.to_thread(write)

    def summary(self) -> str | None:
        """This run's batches by status, e.g. ``completed 1/3, in_progress 2/3`` (None: no batch)."""
        if not self.records:
            return None
        counts = Counter(r.get("status") or r["state"] for r in self.records.values())
        total = len(self.records)
        return ", ".join(f"{s} {n}/{total}" for s, n in sorted(counts.items()))

    async def publish(self) -> None:
        text = self.summary()
        if self.on_state is not None and text is not None and text != self._published:
            self._published = text
            await asyncio.to_thread(self.on_state, text)

    async def collect(self, done: set[str]) -> None:
        """Poll every live batch until it ends, store its replies, send what it lacks online.

        ``done``: sample keys already stored (a batch collected before a crash is not stored twice).
        """
        ended: set[str] = set()
        while True:
            # Batches submitted while collecting (split requests, :meth:`_split`) join the loop.
            live = [r for r in self.records.values() if r["state"] == SUBMITTED and r["name"] not in ended]
            if not live:
                break
            for rec in live:
                if rec.get("status") == CREATE_FAILED:  # never created: nothing to poll
                    ended.add(rec["name"])
                    await self._collect(rec, {"id": None, "status": CREATE_FAILED}, done)
                    continue
                batch = await self.api(rec["teacher"]).retrieve(rec["batch_id"])
                status = batch.get("status")
                if status != rec["status"]:
                    rec.update(status=status, request_counts=batch.get("request_counts"))
                    await self._save(rec)
                if status in TERMINAL:
                    ended.add(rec["name"])
                    await self._collect(rec, batch, done)
            await self.publish()
            waiting = [r for r in live if r["name"] not in ended]
            if waiting:
                await self.run.sleep(min(self.clients[r["teacher"]].teacher.batch_poll_s for r in waiting))

    async def _collect(self, rec: dict[str, Any], batch: Mapping[str, Any], done: set[str]) -> None:
        tc = self.clients[rec["teacher"]]
        api = self.api(rec["teacher"])
        current = (tc.teacher.model, tc.params_hash, self.run.config.prompt_version)
        if (rec["model"], rec["params_hash"], rec["prompt_version"]) != current:
            # Sampled under an earlier config: not this config's samples (rows are built with the
            # current teacher's labels), so neither stored nor replaced online.
            log.warning(
                "shard %s: batch %s was made with other sampling settings; not stored",
                rec["shard"],
                rec["batch_id"],
            )
            rec["collected"] = {"answered": 0, "errors": {}, "stale_config": True}
            self._done_records.append(rec)
            return
        by_id = {r["id"]: r for r in rec["requests"]}
        answered: set[str] = set()
        wanted: dict[str, list[int]] = {}
        short: dict[str, list[int]] = {}  # request id -> samples its reply had no choice for
        # Replies to requests asking several samples: all, those with fewer choices, with one.
        asked_n = fewer = one_choice = 0
        # Samples this batch's split batch holds (made before a restart) come from that batch.
        elsewhere = {
            k
            for r in self.records.values()
            if r.get("split_from") == rec["name"] and r["state"] != COLLECTED
            for k in record_keys(r)
        }

        def key(r: Mapping[str, Any], i: int) -> str:
            return sample_key(
                r["q"]["question_id"], rec["model"], rec["prompt_version"], rec["params_hash"], i
            )

        if batch.get("output_file_id"):
            async for line in api.lines(batch["output_file_id"]):
                item = orjson.loads(line)
                req = by_id.get(item.get("custom_id"))
                response = _reply(item)
                if req is None or response is None or req["id"] in answered:
                    continue  # not ours, or an error: falls back below
                answered.add(req["id"])
                group = req["samples"]
                skip = {i for i in group if key(req, i) in done}
                left = add_reply_rows(
                    self.run, req["q"], tc, group, response, req["seed"], 1, None, batch["id"], skip
                )
                self.collected += sum(1 for i in group[: len(group) - len(left)] if i not in skip)
                if len(group) > 1:
                    asked_n += 1
                    fewer += bool(left)
                    one_choice += len(group) - len(left) == 1
                # Fewer choices than asked (n ignored): batched again, one request per sample.
                todo = [i for i in left if i not in skip and key(req, i) not in elsewhere]
                if todo:
                    short[req["id"]] = todo
        errors = Counter[str]()
        if batch.get("error_file_id"):
            async for line in api.lines(batch["error_file_id"]):
                errors[_error_code(orjson.loads(line))] += 1
        for req in rec["requests"]:
            if req["id"] not in answered:
                todo = [i for i in req["samples"] if key(req, i) not in done and key(req, i) not in elsewhere]
                if todo:
                    wanted.setdefault(req["q"]["question_id"], []).extend(todo)
        rec["collected"] = {"answered": len(answered), "errors": dict(errors)}
        if asked_n:
            rec["collected"].update(n_requests=asked_n, fewer_choices=fewer, one_choice=one_choice)
            if 2 * one_choice >= asked_n:  # most n-requests got one choice: the endpoint ignores n
                await self._remember_n(rec, tc, N_IGNORED, asked_n, one_choice)
            elif not fewer:
                await self._remember_n(rec, tc, N_HONOURED, asked_n, one_choice)
        if short:
            split = await self._split(rec, tc, by_id, short, wanted)
            rec["collected"]["split"] = split
        self._done_records.append(rec)
        n = sum(len(v) for v in wanted.values())
        if n:
            log.warning(
                "shard %s: batch %s %s with %d of %d requests answered (errors: %s); %d samples go online",
                rec["shard"],
                batch["id"],
                batch.get("status"),
                len(answered),
                len(by_id),
                dict(errors) or "none listed",
                n,
            )
            self.fell_back += n
            await self.fallback(tc, wanted)

    async def _remember_n(
        self, rec: Mapping[str, Any], tc: EndpointClient, seen: str, asked: int, one: int
    ) -> None:
        """Remember what the teacher's batches do with ``n`` (``ignored`` is never overwritten)."""
        t = tc.teacher
        if t.name not in self.n_support:
            self.n_support[t.name] = await asyncio.to_thread(batch_n_support, self.run.out, t)
        known = self.n_support[t.name]
        if known == N_IGNORED or known == seen:
            return
        self.n_support[t.name] = seen
        uri = n_support_uri(self.run.out, t.name)
        doc = {
            "teacher": t.name,
            "model": t.model,
            "base_url": public_url(t.base_url),
            "n": seen,
            "n_requests": asked,
            "one_choice": one,
            "shard": rec["shard"],
            "batch_id": rec["batch_id"],
            "seen_at": time.time(),
        }

        def write() -> None:
            storage.check_fence(uri)
            storage.write_json(uri, doc)

        await asyncio.to_thread(write)
        if seen == N_IGNORED:
            log.warning(
                "shard %s: teacher %s ignores n in batches (%d of %d n-requests in batch %s got one "
                "choice): its batch requests are split from now on, one per sample (%s)",
                rec["shard"],
                t.name,
                one,
                asked,
                rec["batch_id"],
                uri,
            )

    async def _split(
        self,
        rec: Mapping[str, Any],
        tc: EndpointClient,
        by_id: Mapping[str, Mapping[str, Any]],
        short: Mapping[str, list[int]],
        wanted: dict[str, list[int]],
    ) -> int:
        """Batch the samples ``short`` (request id -> samples its reply lacked) again, one request
        per sample, with the bodies read back from the batch's input file; returns how many.

        A sample whose body cannot be read back goes online (``wanted``) with a warning.
        """
        left = dict(short)
        chunk = self._chunks.get(tc.teacher.name)
        if chunk is not None:  # nothing is queued while collecting; never mix other requests in
            await self._submit(tc, chunk)
        self._splitting = rec["name"]
        lines = self.api(tc.teacher.name).lines(rec["input_file_id"]).__aiter__()
        try:
            while left:
                try:
                    line = await lines.__anext__()
                except StopAsyncIteration:
                    break
                except BatchAPIError as exc:  # what was not read back goes online below
                    log.warning(
                        "shard %s: input file of batch %s unreadable (%s)", rec["shard"], rec["batch_id"], exc
                    )
                    break
                item = orjson.loads(line)
                samples = left.pop(item.get("custom_id"), None)
                if samples is None:
                    continue
                q = by_id[item["custom_id"]]["q"]
                messages = item["body"]["messages"]
                for i in samples:
                    seed = sample_seed(self.run.config.seed, q["question_id"], i)
                    await self._queue(tc, q, [i], request_kwargs(tc, messages, seed, 1), seed)
        finally:
            self._splitting = None
            await lines.aclose()
        for rid, samples in left.items():  # not found in the input file: online, at the online price
            wanted.setdefault(by_id[rid]["q"]["question_id"], []).extend(samples)
        chunk = self._chunks.get(tc.teacher.name)
        if chunk is not None:
            await self._submit(tc, chunk)
        n = sum(len(v) for k, v in short.items() if k not in left)
        self.split += n
        log.info(
            "shard %s: batch %s: %d samples its replies lacked are batched again, one request each",
            rec["shard"],
            rec["batch_id"],
            n,
        )
        return n

    async def finish(self) -> None:
        """Mark collected batches: call once their rows (and fallbacks) are in the durable journal."""
        for rec in self._done_records:
            rec["state"] = COLLECTED
            await self._save(rec)
        self._done_records = []

    async def close(self) -> None:
        for chunk in self._chunks.values():
            chunk.fh.close()
            os.unlink(chunk.path)
        self._chunks = {}
        for api in self.apis.values():
            await api.close()


def _reply(item: Mapping[str, Any]) -> Fields | None:
    """The chat completion of a successful output line (None for an error or a malformed body)."""
    response = item.get("response") or {}
    if response.get("status_code") != 200 or item.get("error"):
        return None
    try:
        reply = completion_fields(response.get("body"))
    except ValueError:
        return None
    return reply if reply.choices else None


def _error_code(item: Mapping[str, Any]) -> str:
    """Why an error-file line failed: its error code, or the HTTP status of its response."""
    err = item.get("error")
    if isinstance(err, dict) and err.get("code"):
        return str(err["code"])
    response = item.get("response") or {}
    return f"http_{response.get('status_code', 'unknown')}"


def batch_estimate(result: dict[str, Any], config: DistillConfig, out: str | None) -> dict[str, Any]:
    """``--estimate``'s projection (:func:`octomed_data.distill.run.estimate`) with the requests
    batch-mode teachers will really batch, and what batching saves; ``result`` is updated.

    A teacher whose batches are known to honour ``n`` (:func:`batch_n_support` in ``out``) sends
    one request per question; one known to ignore ``n``, or whose ``n`` support in batches is
    unknown, is projected with one request per sample (what the run sends once it has seen ``n``
    ignored: the samples are batched, split). Every sample of a batch-mode teacher is projected
    at the batch price (``batch_share`` 1.0); ``saving`` is 1 - cost / the same tokens online.
    """
    total = online_total = 0.0
    for name, proj in result["teachers"].items():
        t = config.teacher(name)
        m = proj.get("measured")
        if not m:
            continue
        if t.mode == "batch":
            known = batch_n_support(out, t)
            if t.supports_n is False:
                split, note = True, "supports_n is false: one batch request per sample"
            elif known == N_HONOURED:
                split, note = False, "its batches honour n (seen in this output): one request per question"
            elif known == N_IGNORED:
                split, note = True, "its batches ignore n (seen in this output): one batch request per sample"
            else:
                split = True
                note = (
                    "n support in its batches unknown: estimated with one batch request per sample "
                    "(what the run sends if the first batch shows n ignored; fewer prompt tokens if n "
                    "is honoured)"
                )
            requests = proj["samples"] if split else proj["questions"]
            prompt_tokens = int(m["prompt_tokens_per_request"] * requests)
            proj.update(
                requests=requests,
                prompt_tokens=prompt_tokens,
                batch_n=known or "unknown",
                batch_requests="one per sample" if split else "one per question (n)",
                batch_note=note,
            )
        usd = t.cost_usd(proj["prompt_tokens"], proj["completion_tokens"], batch=t.mode == "batch")
        online = t.cost_usd(proj["prompt_tokens"], proj["completion_tokens"])
        proj.update(
            cost_usd=round(usd, 2),
            online_cost_usd=round(online, 2),
            batch_share=1.0 if t.mode == "batch" else 0.0,
            saving=round(1 - usd / online, 4) if online else 0.0,
        )
        total += usd
        online_total += online
    result["total_cost_usd"] = round(total, 2)
    result["total_online_cost_usd"] = round(online_total, 2)
    result["saving"] = round(1 - total / online_total, 4) if online_total else 0.0
    return result
