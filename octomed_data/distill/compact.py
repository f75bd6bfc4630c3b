"""A distilled shard's bookkeeping: its report, config fingerprint, done-signal and compaction.

At the end of a shard the journal is compacted into ``OUT/raw`` (same shard name as the
questions shard), whose committed marker (complete, config fingerprint, the questions commit it
read) is the shard's one done-signal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from octomed_data import storage
from octomed_data.distill.journal import (
    AFTER_COMPACT,
    FAILED,
    KEY_COLUMNS,
    committed_rows,
    iter_journal,
    raw_uri,
    retire,
    row_key,
)
from octomed_data.errors import ConfigError, OctomedError
from octomed_data.schema import SAMPLE_SCHEMA, TaskType
from octomed_data.teachers import DistillConfig

log = logging.getLogger("octomed_data.distill")

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
