"""The sandbox teacher's Files + Batch API: the subset of OpenAI's that batch mode uses.

Mounted by :func:`octomed_data.sandbox.server.build_app` (``batch=BatchConfig(...)``), on the same
server as the chat endpoint, answering with the shapes the real API uses:

- ``POST /v1/files`` (multipart: ``file``, ``purpose=batch``) -> a file object;
- ``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window``, ``metadata``);
- ``GET /v1/batches/{id}``, ``GET /v1/batches`` (``limit``, ``after``; newest first),
  ``POST /v1/batches/{id}/cancel``;
- ``GET /v1/files/{id}/content``: the input, output or error JSONL.

Output lines are ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}``; error-file lines carry a non-200 ``response`` or, for requests a batch never ran
(expired, cancelled), ``response: null`` and ``error: {"code": "batch_expired", ...}``.

Behaviour for tests (:class:`BatchConfig`, changeable while running via
:meth:`octomed_data.sandbox.SandboxHandle.batch_control`): a completion delay, ``hold`` (stay
``in_progress`` until released; ``hold_after``: only the batches after the first K), expiry after the first K requests, per-request errors (by a
hash of the custom_id), whole-batch validation failure, and ``ignore_n``: one choice per batch
request whatever its ``n`` (as some providers' batch endpoints do, even where their online
endpoint honours ``n``). Replies are the chat endpoint's
(:func:`octomed_data.sandbox.completion_payload`), without its transient faults: a batch runs
server-side. ``GET /_sandbox/batch_stats`` counts uploads, creations, retrievals and requests run.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from octomed_data.sandbox.replies import completion_payload, request_key, unit
from octomed_data.sandbox.state import app_state

TERMINAL = ("completed", "expired", "failed", "cancelled")


@dataclass
class BatchConfig:
    """How the sandbox's batches behave."""

    complete_after_s: float = 0.0  # a batch runs this long after creation
    hold: bool = False  # stay in_progress until released (``batch_control(hold=False)``)
    hold_after: int | None = None  # batches created after the first K stay in_progress (as ``hold``)
    expire_after: int | None = None  # expire having run only the first K requests
    error_rate: float = 0.0  # share of requests answered 500 in the error file (by custom_id)
    fail_validation: bool = False  # the whole batch fails validation (no output)
    lose_create_replies: int = 0  # the first K creates make the batch, then answer 500
    refuse_create: bool = False  # every create answers 400 (quota exhausted, billing): no batch made
    rate_limit_first: int = 0  # the first K Files/Batch API calls answer 429 with Retry-After
    ignore_n: bool = False  # batch requests get one choice whatever their n (online is unchanged)
    seed: int = 0


@dataclass
class BatchState:
    """Files, batches and counts of one sandbox server."""

    config: BatchConfig
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> object + "_data"
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> object + "_created"
    uploads: int = 0
    creations: int = 0
    refused: int = 0
    retrievals: int = 0
    lists: int = 0
    executed: int = 0  # requests run inside batches (never counted as online requests)
    calls: int = 0  # every Files/Batch API call (429s included)
    rate_limited: int = 0


BATCH_STATE: web.AppKey[BatchState] = web.AppKey("sandbox_batch_state", BatchState)


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def _new_file(bs: BatchState, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
    fid = f"file-{uuid.uuid4().hex[:24]}"
    obj = {
        "id": fid,
        "object": "file",
        "bytes": len(data),
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "_data": data,
    }
    bs.files[fid] = obj
    return obj


async def _upload(request: web.Request) -> web.Response:
    bs = request.app[BATCH_STATE]
    form = await request.post()
    upload = form.get("file")
    if form.get("purpose") != "batch" or upload is None or not hasattr(upload, "file"):
        return _error("expected multipart 'file' and purpose=batch")
    bs.uploads += 1
    obj = _new_file(bs, upload.file.read(), upload.filename or "input.jsonl", "batch")
    return web.json_response(_public(obj))


async def _create(request: web.Request) -> web.Response:
    bs = request.app[BATCH_STATE]
    body = await request.json()
    fid = body.get("input_file_id")
    if fid not in bs.files:
        return _error(f"no file {fid!r}", 404)
    if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
        return _error("endpoint must be /v1/chat/completions and completion_window 24h")
    if bs.config.refuse_create:
        bs.refused += 1
        return _error("batch quota exceeded for this organization (sandbox)", 400)
    bs.creations += 1
    now = int(time.time())
    lines = [orjson.loads(x) for x in bs.files[fid]["_data"].splitlines() if x.strip()]
    batch = {
        "id": f"batch_{uuid.uuid4().hex[:24]}",
        "object": "batch",
        "endpoint": body["endpoint"],
        "errors": None,
        "input_file_id": fid,
        "completion_window": "24h",
        "status": "in_progress",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": now,
        "expires_at": now + 86400,
        "completed_at": None,
        "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
        "metadata": body.get("metadata") or {},
        "_created": time.monotonic(),
        "_seq": bs.creations,
        "_lines": lines,
    }
    ids = [line.get("custom_id") for line in lines]
    if bs.config.fail_validation or len(set(ids)) != len(ids) or None in ids:
        batch.update(status="failed", errors={"object": "list", "data": [{"code": "invalid_input"}]})
    bs.batches[batch["id"]] = batch
    if bs.creations <= bs.config.lose_create_replies:
        return web.json_response({"error": {"message": "internal error (sandbox)"}}, status=500)
    return web.json_response(_public(batch))


def _advance(request: web.Request, batch: dict[str, Any]) -> None:
    """Run the batch once its time has come (all at once: the sandbox answers instantly)."""
    bs = request.app[BATCH_STATE]
    cfg = bs.config
    if batch["status"] != "in_progress" or cfg.hold:
        return
    if cfg.hold_after is not None and batch["_seq"] > cfg.hold_after:
        return
    if time.monotonic() - batch["_created"] < cfg.complete_after_s:
        return
    state = app_state(request.app)
    out: list[bytes] = []
    errors: list[bytes] = []
    now = time.time()
    for i, line in enumerate(batch["_lines"]):
        cid = line["custom_id"]
        rid = f"batch_req_{uuid.uuid4().hex[:16]}"
        if cfg.expire_after is not None and i >= cfg.expire_after:
            err = {"code": "batch_expired", "message": "not executed before the completion window expired"}
            errors.append(orjson.dumps({"id": rid, "custom_id": cid, "response": None, "error": err}))
            continue
        bs.executed += 1
        if unit("batch_error", cfg.seed, cid) < cfg.error_rate:
            body = {"error": {"message": "internal error (sandbox batch)", "type": "server_error"}}
            resp = {"status_code": 500, "request_id": rid, "body": body}
            errors.append(orjson.dumps({"id": rid, "custom_id": cid, "response": resp, "error": None}))
            continue
        honour_n = False if cfg.ignore_n else None
        payload = completion_payload(state, line["body"], request_key(line["body"]), now, honour_n=honour_n)
        resp = {"status_code": 200, "request_id": rid, "body": payload}
        out.append(orjson.dumps({"id": rid, "custom_id": cid, "response": resp, "error": None}))
    expired = cfg.expire_after is not None and cfg.expire_after < len(batch["_lines"])
    batch["status"] = "expired" if expired else "completed"
    batch["completed_at" if not expired else "expired_at"] = int(now)
    batch["request_counts"].update(completed=len(out), failed=len(errors))
    if out:
        batch["output_file_id"] = _new_file(bs, b"\n".join(out) + b"\n", "output.jsonl", "batch_output")["id"]
    if errors:
        batch["error_file_id"] = _new_file(bs, b"\n".join(errors) + b"\n", "errors.jsonl", "batch_output")[
            "id"
        ]


async def _retrieve(request: web.Request) -> web.Response:
    bs = request.app[BATCH_STATE]
    batch = bs.batches.get(request.match_info["batch_id"])
    if batch is None:
        return _error("no such batch", 404)
    bs.retrievals += 1
    _advance(request, batch)
    return web.json_response(_public(batch))


async def _list(request: web.Request) -> web.Response:
    bs = request.app[BATCH_STATE]
    bs.lists += 1
    limit = int(request.query.get("limit", "20"))
    after = request.query.get("after")
    ordered = list(reversed(bs.batches.values()))  # newest first, as the API lists them
    if after:
        ids = [b["id"] for b in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    page = ordered[:limit]
    return web.json_response(
        {
            "object": "list",
            "data": [_public(b) for b in page],
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ordered) > limit,
        }
    )


async def _cancel(request: web.Request) -> web.Response:
    bs = request.app[BATCH_STATE]
    batch = bs.batches.get(request.match_info["batch_id"])
    if batch is None:
        return _error("no such batch", 404)
    if batch["status"] not in TERMINAL:
        batch["status"] = "cancelled"
        batch["cancelled_at"] = int(time.time())
    return web.json_response(_public(batch))


async def _content(request: web.Request) -> web.Response:
    obj = request.app[BATCH_STATE].files.get(request.match_info["file_id"])
    if obj is None:
        return _error("no such file", 404)
    return web.Response(body=obj["_data"], content_type="application/octet-stream")


def stats_of(bs: BatchState) -> dict[str, Any]:
    """Counts, and every batch as the API shows it."""
    return {
        "uploads": bs.uploads,
        "creations": bs.creations,
        "refused": bs.refused,
        "retrievals": bs.retrievals,
        "lists": bs.lists,
        "executed": bs.executed,
        "calls": bs.calls,
        "rate_limited": bs.rate_limited,
        "batches": [_public(b) for b in bs.batches.values()],
    }


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(stats_of(request.app[BATCH_STATE]))


@web.middleware
async def _rate_limit(request: web.Request, handler: Any) -> web.StreamResponse:
    """The first ``rate_limit_first`` Files/Batch API calls answer 429 (Retry-After: 0.05 s)."""
    bs = request.app[BATCH_STATE]
    if request.path.startswith(("/v1/files", "/v1/batches")):
        bs.calls += 1
        if bs.calls <= bs.config.rate_limit_first:
            bs.rate_limited += 1
            err = {"error": {"message": "rate limited (sandbox)", "type": "rate_limit_error"}}
            return web.json_response(err, status=429, headers={"retry-after-ms": "50"})
    return await handler(request)


def mount(app: web.Application, config: BatchConfig) -> None:
    """Add the Files + Batch API routes to a sandbox application."""
    app[BATCH_STATE] = BatchState(config)
    app.middlewares.append(_rate_limit)
    app.router.add_post("/v1/files", _upload)
    app.router.add_get("/v1/files/{file_id}/content", _content)
    app.router.add_post("/v1/batches", _create)
    app.router.add_get("/v1/batches", _list)
    app.router.add_get("/v1/batches/{batch_id}", _retrieve)
    app.router.add_post("/v1/batches/{batch_id}/cancel", _cancel)
    app.router.add_get("/_sandbox/batch_stats", _stats)
