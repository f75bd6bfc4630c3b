"""Batch records: what a folder's Batch API batches hold, and what a teacher's batches do with ``n``.

Every batch is journalled as ``FOLDER/_batches/<shard>/<record>.json`` through the storage layer
(:class:`~octomed_data.inference.batch_run.BatchRun` writes them): its teacher, the requests
(``q``: what the caller needs to store a reply, ``samples``, ``seed``), the input file, then the
batch id. What a teacher's batch endpoint does with ``n`` is remembered in
``FOLDER/_batches/_teachers/<teacher>.json`` (:func:`batch_n_support`).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from octomed_data import storage
from octomed_data.inference.client import EndpointClient
from octomed_data.inference.fleet import public_url
from octomed_data.inference.transport_http import Fields, completion_fields
from octomed_data.layout import DistillFolder
from octomed_data.teachers import TeacherConfig

SUBMITTING, SUBMITTED, COLLECTED = "submitting", "submitted", "collected"
CREATE_FAILED = "create_failed"  # the create call was refused: the samples go online
N_IGNORED, N_HONOURED = "ignored", "honoured"


class BatchJobs(Protocol):
    """What a caller of the Batch backend says about its requests."""

    version: str  # the prompt (or rubric) version its records carry

    def key(self, q: Mapping[str, Any], model: str, version: str, params_hash: str, i: int) -> str:
        """The journal key of sample ``i`` of a request whose record fields are ``q``."""

    def seed(self, q: Mapping[str, Any], i: int) -> int:
        """The seed of sample ``i`` (the first sample's for an n-request)."""

    def store(
        self,
        q: Mapping[str, Any],
        tc: EndpointClient,
        group: list[int],
        response: Any,
        seed: int | None,
        batch_id: str,
        skip: set[int],
    ) -> list[int]:
        """Journal a reply's choices as samples ``group`` (``skip`` left out); return those it lacked."""

    async def fallback(self, tc: EndpointClient, wanted: list[tuple[Mapping[str, Any], list[int]]]) -> None:
        """Request ``wanted`` (record fields, samples) online: what a batch gave no reply for."""


def n_support_uri(out: str, teacher: str) -> str:
    """Where what a teacher's batches do with ``n`` is remembered."""
    return DistillFolder(out).teacher_n_support(teacher)


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
    return DistillFolder(out).batches(shard)


def read_records(out: str, shard: str) -> list[dict[str, Any]]:
    """Every batch record of a shard, oldest first (names start with a time stamp)."""
    return [storage.read_json(u) for u in sorted(storage.list_files(batch_dir(out, shard), ".json"))]


def batch_reply(item: Mapping[str, Any]) -> Fields | None:
    """The chat completion of a successful output line (None for an error or a malformed body)."""
    response = item.get("response") or {}
    if response.get("status_code") != 200 or item.get("error"):
        return None
    try:
        reply = completion_fields(response.get("body"))
    except ValueError:
        return None
    return reply if reply.choices else None


def error_code(item: Mapping[str, Any]) -> str:
    """Why an error-file line failed: its error code, or the HTTP status of its response."""
    err = item.get("error")
    if isinstance(err, dict) and err.get("code"):
        return str(err["code"])
    response = item.get("response") or {}
    return f"http_{response.get('status_code', 'unknown')}"


def fenced_write(uri: str, doc: Mapping[str, Any]) -> None:
    """Write a JSON record unless this writer lost the shard's lease."""
    storage.check_fence(uri)
    storage.write_json(uri, doc)


def write_n_support(
    out: str, t: TeacherConfig, seen: str, asked: int, one: int, rec: Mapping[str, Any]
) -> str:
    """Remember what ``t``'s batches were seen to do with ``n`` (in batch ``rec``); returns where."""
    uri = n_support_uri(out, t.name)
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
    fenced_write(uri, doc)
    return uri


def batch_summary(records: Iterable[Mapping[str, Any]]) -> str | None:
    """Batches by status, e.g. ``completed 1/3, in_progress 2/3`` (None: no batch)."""
    counts = Counter(r.get("status") or r["state"] for r in records)
    total = sum(counts.values())
    return ", ".join(f"{s} {n}/{total}" for s, n in sorted(counts.items())) if total else None


@dataclass
class Chunk:
    """Requests for one teacher being written to a local JSONL (the next batch's input file)."""

    path: str
    fh: Any
    requests: list[dict[str, Any]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    bytes: int = 0
    split_from: str | None = None  # the record whose samples it batches again, one per request

    @classmethod
    def open(cls, split_from: str | None = None) -> Chunk:
        fd, path = tempfile.mkstemp(prefix="octomed-batch-in-", suffix=".jsonl")
        return cls(path, os.fdopen(fd, "wb"), split_from=split_from)

    def add(self, line: bytes, request: dict[str, Any]) -> None:
        """One request line (``custom_id`` = ``request["id"]``) and what its record keeps of it."""
        self.fh.write(line + b"\n")
        self.bytes += len(line) + 1
        self.ids.add(request["id"])
        self.requests.append(request)
