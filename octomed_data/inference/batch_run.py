"""The Batch backend of the request processor: a ``mode: batch`` teacher's requests go through the
Files + Batch API instead of one by one, into the same journal.

Per shard and teacher, the request bodies (those online requests carry,
:func:`~octomed_data.inference.processor.request_kwargs`) are written to a local JSONL, uploaded and
submitted as batches of at most ``batch_max_requests`` / ``batch_max_bytes``, polled every
``batch_poll_s`` and collected; the caller's :class:`~octomed_data.inference.batch_records.BatchJobs`
stores the replies (with ``batch_id``) and sends online what a batch gave no reply for. Every batch
is recorded *before* its create call and again with its id, so a killed run finds its batches
(adopting one whose create answer it never saw) and never submits a live key twice. A server that
ignores ``n`` in batches is detected from the output: the samples a reply lacked are batched again
one per request, never silently sent online, and the teacher's ``n`` support is remembered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from pydantic import SecretStr

from octomed_data.inference.batch_api import CHAT_ENDPOINT, TERMINAL, BatchAPI, BatchAPIError
from octomed_data.inference.batch_records import (
    COLLECTED,
    CREATE_FAILED,
    N_HONOURED,
    N_IGNORED,
    SUBMITTED,
    SUBMITTING,
    BatchJobs,
    Chunk,
    batch_n_support,
    batch_reply,
    batch_summary,
    error_code,
    fenced_write,
    n_support_uri,
    read_records,
    write_n_support,
)
from octomed_data.inference.client import EndpointClient
from octomed_data.inference.processor import RequestProcessor, request_kwargs
from octomed_data.layout import DistillFolder
from octomed_data.teachers import TeacherConfig

log = logging.getLogger("octomed_data.distill.batch")  # the name people filter batch logs by


class BatchRun:
    """One shard's batches: submit pending groups, resume earlier runs' batches, poll, collect."""

    def __init__(
        self, proc: RequestProcessor, jobs: BatchJobs, on_state: Callable[[str], Any] | None = None
    ) -> None:
        self.proc = proc
        self.clients = proc.clients
        self.jobs = jobs
        self.on_state = on_state
        self.records: dict[str, dict[str, Any]] = {}  # this run's batches (resumed and new)
        self.live: set[str] = set()  # sample keys in batches that are not collected yet
        self.apis: dict[str, BatchAPI] = {}
        self._chunks: dict[str, Chunk] = {}
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
                max_attempts=self.proc.max_attempts,
                backoff=self.proc.backoff,
                sleep=self.proc.sleep,
            )
        return self.apis[teacher]

    async def load(self) -> None:
        """Pick up earlier runs' batches that were not collected (a crash, a restarted flow)."""
        records = await asyncio.to_thread(read_records, self.proc.folder, self.proc.shard)
        for rec in records:
            if rec["state"] == COLLECTED:
                continue
            if rec["teacher"] not in self.clients:
                log.warning(
                    "shard %s: batch record %s of teacher %r not collected: the teacher is no longer routed",
                    self.proc.shard,
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
            self.live.update(self.record_keys(rec))
            self.resumed += 1
        await self.publish()

    async def n_ignored(self, tc: EndpointClient) -> bool:
        """True when the teacher's batches are known to ignore ``n`` (its requests are split)."""
        name = tc.teacher.name
        if name not in self.n_support:
            known = await asyncio.to_thread(batch_n_support, self.proc.folder, tc.teacher)
            self.n_support[name] = known
            if known == N_IGNORED and tc.supports_n:
                log.info(
                    "shard %s: teacher %s ignores n in batches (%s): one batch request per sample",
                    self.proc.shard,
                    name,
                    n_support_uri(self.proc.folder, name),
                )
        return self.n_support[name] == N_IGNORED

    def record_keys(self, rec: Mapping[str, Any]) -> list[str]:
        """The keys a batch record holds."""
        return [
            self.jobs.key(r["q"], rec["model"], rec["prompt_version"], rec["params_hash"], i)
            for r in rec["requests"]
            for i in r["samples"]
        ]

    async def add(
        self,
        rid: str,
        q: Mapping[str, Any],
        tc: EndpointClient,
        messages: list[dict[str, Any]],
        pending: list[int],
    ) -> None:
        """Queue samples ``pending`` of request ``rid`` for the teacher's next batch (submitted
        when full); ``q`` is what storing its reply needs (kept in the record)."""
        together = tc.supports_n and len(pending) > 1 and not await self.n_ignored(tc)
        for group in [pending] if together else [[i] for i in pending]:
            seed = self.jobs.seed(q, group[0])
            await self._queue(tc, rid, q, group, request_kwargs(tc, messages, seed, len(group)), seed)

    async def _queue(
        self,
        tc: EndpointClient,
        rid: str,
        q: Mapping[str, Any],
        group: list[int],
        body: dict[str, Any],
        seed: int,
    ) -> None:
        """Write one request (samples ``group`` of ``rid``) into the teacher's next batch."""
        t = tc.teacher
        body.update(body.pop("extra_body", None) or {})  # top level, as the chat transport sends it
        cid = f"{rid}|{','.join(map(str, group))}"
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
            chunk = self._chunks[t.name] = Chunk.open(self._splitting)
        # The seed the request carries (none when the teacher's seed policy is off).
        chunk.add(line, {"id": cid, "q": dict(q), "samples": group, "seed": seed if tc.sends_seed else None})

    async def flush(self) -> None:
        """Submit every partly filled batch (the shard's questions are all queued)."""
        for name, chunk in list(self._chunks.items()):
            await self._submit(self.clients[name], chunk)

    async def _submit(self, tc: EndpointClient, chunk: Chunk) -> None:
        t = tc.teacher
        self._chunks.pop(t.name, None)
        chunk.fh.close()
        try:
            shard = self.proc.shard
            uploaded = await self.api(t.name).upload(chunk.path, filename=f"{shard}-{t.name}.jsonl")
        finally:
            os.unlink(chunk.path)
        rec = {
            "name": f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}",
            "shard": self.proc.shard,
            "teacher": t.name,
            "model": t.model,
            "prompt_version": self.jobs.version,
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
        self.live.update(self.record_keys(rec))
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
        uri = DistillFolder(self.proc.folder).batch_record(self.proc.shard, rec["name"])
        await asyncio.to_thread(fenced_write, uri, rec)

    def summary(self) -> str | None:
        """This run's batches by status, e.g. ``completed 1/3, in_progress 2/3`` (None: no batch)."""
        return batch_summary(self.records.values())

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
                await self.proc.sleep(min(self.clients[r["teacher"]].teacher.batch_poll_s for r in waiting))

    async def _collect(self, rec: dict[str, Any], batch: Mapping[str, Any], done: set[str]) -> None:
        tc = self.clients[rec["teacher"]]
        api = self.api(rec["teacher"])
        current = (tc.teacher.model, tc.params_hash, self.jobs.version)
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
        wanted: list[tuple[Mapping[str, Any], list[int]]] = []
        short: dict[str, list[int]] = {}  # request id -> samples its reply had no choice for
        # Replies to requests asking several samples: all, those with fewer choices, with one.
        asked_n = fewer = one_choice = 0
        # Samples this batch's split batch holds (made before a restart) come from that batch.
        elsewhere = {
            k
            for r in self.records.values()
            if r.get("split_from") == rec["name"] and r["state"] != COLLECTED
            for k in self.record_keys(r)
        }

        def key(r: Mapping[str, Any], i: int) -> str:
            return self.jobs.key(r["q"], rec["model"], rec["prompt_version"], rec["params_hash"], i)

        if batch.get("output_file_id"):
            async for line in api.lines(batch["output_file_id"]):
                item = orjson.loads(line)
                req = by_id.get(item.get("custom_id"))
                response = batch_reply(item)
                if req is None or response is None or req["id"] in answered:
                    continue  # not ours, or an error: falls back below
                answered.add(req["id"])
                group = req["samples"]
                skip = {i for i in group if key(req, i) in done}
                left = self.jobs.store(req["q"], tc, group, response, req["seed"], batch["id"], skip)
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
                errors[error_code(orjson.loads(line))] += 1
        for req in rec["requests"]:
            if req["id"] not in answered:
                todo = [i for i in req["samples"] if key(req, i) not in done and key(req, i) not in elsewhere]
                if todo:
                    wanted.append((req["q"], todo))
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
        n = sum(len(v) for _, v in wanted)
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
            await self.jobs.fallback(tc, wanted)

    async def _remember_n(
        self, rec: Mapping[str, Any], tc: EndpointClient, seen: str, asked: int, one: int
    ) -> None:
        """Remember what the teacher's batches do with ``n`` (``ignored`` is never overwritten)."""
        t = tc.teacher
        if t.name not in self.n_support:
            self.n_support[t.name] = await asyncio.to_thread(batch_n_support, self.proc.folder, t)
        known = self.n_support[t.name]
        if known == N_IGNORED or known == seen:
            return
        self.n_support[t.name] = seen
        uri = await asyncio.to_thread(write_n_support, self.proc.folder, t, seen, asked, one, rec)
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
        wanted: list[tuple[Mapping[str, Any], list[int]]],
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
                rid = item["custom_id"].rsplit("|", 1)[0]
                for i in samples:
                    seed = self.jobs.seed(q, i)
                    await self._queue(tc, rid, q, [i], request_kwargs(tc, messages, seed, 1), seed)
        finally:
            self._splitting = None
            await lines.aclose()
        for rid, samples in left.items():  # not found in the input file: online, at the online price
            wanted.append((by_id[rid]["q"], samples))
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
