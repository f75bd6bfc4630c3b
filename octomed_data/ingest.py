"""Ingest: read an upstream file as a FORMAT and write questions + quarantine as Parquet.

:func:`ingest_entry` (one source entry = one shard of the ingest stage,
:mod:`octomed_data.stages.ingest`, whose ``ingest(fmt, input_path, out)`` runs it) streams records from :func:`octomed_data.sources.iter_records`
into ``out/questions`` (QUESTION_SCHEMA) and ``out/quarantine`` (QUARANTINE_SCHEMA), shards
of ``shard_size`` rows committed atomically through :class:`~octomed_data.storage.Dataset`,
and images into the content-addressed store ``out/images/``. At most one shard of rows is
held in memory. A question id seen earlier in the run is quarantined as ``duplicate``.
Invariant: ``records == questions + quarantined``.

``ingest_many(entries, out)`` (also there) does the same for several inputs into one output (the demo);
shard names carry the entry name (``medqa-00000``) so they never collide, and duplicates are
found across entries.

A run owns the shards named with its prefix: shards of an earlier run with the same prefix
that this run did not rewrite are un-committed at the end, so re-running never leaves stale
rows behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.images import ImageStore
from octomed_data.layout import IngestFolder
from octomed_data.schema import ENTRY_SCHEMA, QUARANTINE_SCHEMA, QUESTION_SCHEMA, quarantine_row
from octomed_data.sources import get_format, iter_records

SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data"
DEMO_CONFIG = SAMPLE_DATA_DIR / "demo.yaml"

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    """What an ingest run wrote and counted. All fields are plain data (JSON-serialisable)."""

    questions_uri: str
    quarantine_uri: str
    images_uri: str
    records: int = 0
    questions: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)  # committed question shard names
    quarantine_shards: list[str] = field(default_factory=list)
    images_stored: int = 0  # objects newly written to the image store
    images_decoded: int = 0
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    cleaned: dict[str, int] = field(default_factory=dict)  # control_chars_removed, records_with_control_chars
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ShardSplitter:
    """Buffers rows and commits a shard (through the storage layer) every ``shard_size`` rows."""

    def __init__(
        self, dataset: storage.Dataset, prefix: str, shard_size: int, extra: Mapping[str, Any]
    ) -> None:
        self.dataset = dataset
        self.prefix = prefix
        self.shard_size = shard_size
        self.extra = dict(extra)
        self.rows: list[dict[str, Any]] = []
        self.written: list[str] = []

    def name(self, n: int) -> str:
        return f"{self.prefix}-{n:05d}" if self.prefix else f"{n:05d}"

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = self.name(len(self.written))
        self.dataset.write_shard(name, self.rows, extra=self.extra)
        self.written.append(name)
        self.rows = []

    def owned_inputs(self) -> set[str]:
        """Inputs (format:path) of the shards already committed under this writer's prefix."""
        return {
            owned
            for name, owned in self.dataset.committed(
                lambda info: f"{info.extra.get('format')}:{info.extra.get('input')}"
            ).items()
            if _owned_by(name, self.prefix)
        }

    def drop_stale(self) -> None:
        """Un-commit shards of an earlier run with this prefix that this run did not write."""
        self.dataset.drop_stale(keep=self.written, owns=lambda name: _owned_by(name, self.prefix))


class _Seen:
    """Question ids already written in this run, with where each first appeared.

    The one per-question state a run keeps: an int key and an int value (file number and record
    index packed together), about 125 bytes per question (10M questions: ~1.2 GB).
    """

    _INDEX_BITS = 40  # record indexes below 2**40

    def __init__(self) -> None:
        self.first: dict[int, int] = {}  # int(question_id, 16) -> file_no << 40 | record_index
        self.files: list[str] = []
        self._file_no: dict[str, int] = {}

    def check(self, row: dict[str, Any]) -> str | None:
        """None if new (and remember it), else where the first occurrence was."""
        key = int(row["question_id"], 16)
        hit = self.first.get(key)
        if hit is not None:
            return f"{self.files[hit >> self._INDEX_BITS]}#{hit & ((1 << self._INDEX_BITS) - 1)}"
        f = row["input_file"]
        if f not in self._file_no:
            self._file_no[f] = len(self.files)
            self.files.append(f)
        self.first[key] = (self._file_no[f] << self._INDEX_BITS) | int(row["record_index"])
        return None


def _entry_name(entry: Mapping[str, Any]) -> str:
    name = str(entry.get("name") or entry.get("source") or entry["format"])
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_.-") or str(entry["format"])


@dataclass(frozen=True)
class EntryPlan:
    """One validated source entry: its name (shard prefix), the entry and the loader options."""

    name: str
    entry: dict[str, Any]
    options: dict[str, Any]
    prefix: str  # "" when the single entry writes shards 00000, 00001, ...


def plan_entries(entries: Iterable[Mapping[str, Any]], *, shard_prefix: bool = True) -> list[EntryPlan]:
    """Validate every entry before any record is read: a typo in the last one costs nothing."""
    entries = [dict(e) for e in entries]
    if not entries:
        raise ConfigError("nothing to ingest: no entries")
    if not shard_prefix and len(entries) > 1:
        raise ConfigError("several inputs into one output need shard prefixes")
    used: set[str] = set()
    plans = []
    for entry in entries:
        if "format" not in entry or "input" not in entry:
            raise ConfigError(f"ingest entry needs 'format' and 'input': {entry}")
        get_format(str(entry["format"]))
        base = name = _entry_name(entry)
        k = 1
        while name in used:  # "m", "m", "m-2" -> m, m-2, m-2-2: every entry keeps its own name
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        options = dict(entry.get("options") or {})
        for key in ("split", "source"):
            if entry.get(key):
                options[key] = entry[key]
        options.setdefault("source", entry["format"])
        # Fail on unknown options / wrong paths now (iter_records checks eagerly).
        iter_records(str(entry["format"]), str(entry["input"]), images_dir=entry.get("images"), **options)
        plans.append(EntryPlan(name, entry, options, name if shard_prefix else ""))
    return plans


def input_version(path: str) -> str:
    """A cheap fingerprint of an input (file or folder, local or URI): sizes and modification times.

    Part of an entry's done marker, so an input edited in place is ingested again on resume.
    """
    if "://" not in path or path.startswith("file://"):
        local = path.removeprefix("file://")
        if os.path.isdir(local):
            n = size = newest = 0
            for root, _, files in os.walk(local):
                for f in files:
                    st = os.stat(os.path.join(root, f))
                    n, size, newest = n + 1, size + st.st_size, max(newest, st.st_mtime_ns)
            return f"dir:{n}:{size}:{newest}"
        if os.path.exists(local):
            st = os.stat(local)
            return f"file:{st.st_size}:{st.st_mtime_ns}"
        return "missing"
    fs, p = storage.filesystem(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        return "missing"
    if info.get("type") == "directory":
        # A folder of objects: every object's size and version, so one edited object counts.
        n, digest = 0, hashlib.sha256()
        for name, obj in sorted(fs.find(p, detail=True).items()):
            n += 1
            digest.update(f"{name}:{obj.get('size')}:{_object_version(obj)}\n".encode())
        return f"objdir:{n}:{digest.hexdigest()[:16]}"
    return f"obj:{info.get('size')}:{_object_version(info)}"


def _object_version(info: Mapping[str, Any]) -> Any:
    return info.get("ETag") or info.get("LastModified") or info.get("mtime")


def entries_uri(out: str) -> str:
    """One committed shard per ingested entry (its counts): the ingest stage's done-signal."""
    return IngestFolder(out).entries


def ingest_entry(
    plan: EntryPlan, out: str, *, shard_size: int = 5000, progress: bool = False
) -> dict[str, Any]:
    """Ingest one entry into ``out`` (questions, quarantine, images); returns and commits its counts.

    Duplicates within the entry are quarantined here; duplicates of other entries by
    :func:`quarantine_cross_duplicates` once all entries are in. The entry's marker in
    ``out/entries`` is written last: it is the entry's done-signal.
    """
    if shard_size < 1:
        raise ConfigError(f"shard size must be >= 1, got {shard_size}")
    entry = plan.entry
    questions_ds = storage.Dataset(IngestFolder(out).questions, QUESTION_SCHEMA)
    quarantine_ds = storage.Dataset(IngestFolder(out).quarantine, QUARANTINE_SCHEMA)
    store = ImageStore(out)
    extra = {
        "format": entry["format"],
        "input": str(entry["input"]),
        "entry": plan.name,
        "input_version": input_version(str(entry["input"])),
    }
    q_writer = _ShardSplitter(questions_ds, plan.prefix, shard_size, extra)
    x_writer = _ShardSplitter(quarantine_ds, plan.prefix, shard_size, extra)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    cleaned: Counter[str] = Counter()  # control characters stripped by the loaders
    # Same output + same shard names = a re-run that replaces them. Say so when the shards
    # being replaced came from another input: that is lost data if it was not intended.
    this_input = f"{extra['format']}:{extra['input']}"
    others = sorted(q_writer.owned_inputs() - {this_input})
    if others:
        log.warning(
            "%s: replacing shards%s written from %s; use a shard prefix to keep both",
            questions_ds.uri,
            f" {plan.prefix}-*" if plan.prefix else "",
            ", ".join(others),
        )
    seen = _Seen()
    bar = _progress_bar(progress)
    if bar is not None:
        bar.set_description(plan.name)
    started = time.perf_counter()
    try:
        records = iter_records(
            str(entry["format"]),
            str(entry["input"]),
            image_store=store,
            images_dir=entry.get("images"),
            counts=cleaned,
            **plan.options,
        )
        for kind, row in records:
            counts["records"] += 1
            if kind == "question":
                first = seen.check(row)
                if first is not None:
                    kind, row = "quarantine", _duplicate(row, first)
            if kind == "question":
                q_writer.add(row)
                counts["questions"] += 1
            else:
                x_writer.add(row)
                counts["quarantined"] += 1
                reasons[row["reason"]] += 1
            if bar is not None:
                bar.update(1)
                if counts["records"] % 500 == 0:
                    bar.set_postfix(questions=counts["questions"], refresh=False)
    finally:
        if bar is not None:
            bar.close()
    q_writer.flush()
    x_writer.flush()
    q_writer.drop_stale()
    x_writer.drop_stale()
    result = {
        "records": counts["records"],
        "questions": counts["questions"],
        "quarantined": counts["quarantined"],
        "reasons": dict(sorted(reasons.items())),
        "shards": q_writer.written,
        "quarantine_shards": x_writer.written,
        "images_stored": store.written,
        "images_decoded": store.decoded,
        "cleaned": dict(sorted(cleaned.items())),
        "seconds": round(time.perf_counter() - started, 3),
    }
    row = {k: extra[k] for k in ("entry", "format", "input")} | {
        k: counts[k] for k in ("records", "questions", "quarantined")
    }
    storage.Dataset(entries_uri(out), ENTRY_SCHEMA).write_shard(
        plan.name, [row], extra=extra | {"counts": result}
    )
    return result


def quarantine_cross_duplicates(out: str, plans: list[EntryPlan]) -> int:
    """Move questions seen in an earlier entry (recipe order) to quarantine as ``duplicate``.

    Streams question ids entry by entry (the one per-question state: :class:`_Seen`); a shard
    holding duplicates is rewritten without them and the duplicates committed as the quarantine
    shard ``<shard>-dup``, so ``records == questions + quarantined`` still holds. Idempotent. The
    entry whose shards were rewritten records the commits of the earlier entries it was compared
    with (``dedup_against``): when one of those is re-ingested, this entry is no longer done and is
    ingested again from its input, so no row is lost to a duplicate that no longer exists.
    """
    folder = IngestFolder(out)
    questions_ds = storage.Dataset(folder.questions, QUESTION_SCHEMA)
    quarantine_ds = storage.Dataset(folder.quarantine, QUARANTINE_SCHEMA)
    entries = storage.Dataset(folder.entries, ENTRY_SCHEMA)
    manifest = questions_ds.manifest()
    seen = _Seen()
    moved = 0
    earlier: dict[str, float] = {}
    for plan in plans:
        rewritten = False
        for shard in (name for name in manifest if _owned_by(name, plan.prefix)):
            keep: list[dict[str, Any]] = []
            dups: list[dict[str, Any]] = []
            for row in questions_ds.iter_rows(shards=[shard]):
                first = seen.check(row)
                (keep if first is None else dups).append(row if first is None else _duplicate(row, first))
            if dups:
                extra = manifest[shard].extra
                quarantine_ds.write_shard(f"{shard}-dup", dups, extra=extra)
                questions_ds.write_shard(shard, keep, extra=extra)
                moved += len(dups)
                rewritten = True
        info = entries.shard_info(plan.name)
        if info is None:
            continue
        if rewritten:
            row = entries.read_shard(plan.name).to_pylist()
            info = entries.write_shard(plan.name, row, extra=info.extra | {"dedup_against": dict(earlier)})
        earlier[plan.name] = info.committed_at
    return moved


def _owned_by(shard: str, prefix: str) -> bool:
    """A shard this entry's prefix owns (its ``-dup`` quarantine shards included)."""
    return bool(re.match(rf"^{re.escape(prefix)}-\d{{5}}(-dup)?$" if prefix else r"^\d{5}(-dup)?$", shard))


def summarize_ingest(out: str, plans: list[EntryPlan], seconds: float = 0.0) -> IngestResult:
    """The run's summary from the entries' markers (and the duplicates moved across entries)."""
    questions_ds = storage.Dataset(IngestFolder(out).questions, QUESTION_SCHEMA)
    quarantine_ds = storage.Dataset(IngestFolder(out).quarantine, QUARANTINE_SCHEMA)
    result = IngestResult(
        questions_uri=questions_ds.uri,
        quarantine_uri=quarantine_ds.uri,
        images_uri=ImageStore(out).images_uri or "",
    )
    entries = storage.Dataset(entries_uri(out))
    reasons: Counter[str] = Counter()
    q_manifest = set(questions_ds.committed_names())
    x_manifest = quarantine_ds.committed(lambda info: info.rows)
    for plan in plans:
        info = entries.shard_info(plan.name)
        if info is None:
            continue
        c = info.extra["counts"]
        dup_moved = sum(x_manifest[f"{s}-dup"] for s in c["shards"] if f"{s}-dup" in x_manifest)
        questions = c["questions"] - dup_moved
        quarantined = c["quarantined"] + dup_moved
        result.per_source[plan.name] = {
            "records": c["records"],
            "questions": questions,
            "quarantined": quarantined,
        }
        result.records += c["records"]
        result.questions += questions
        result.quarantined += quarantined
        reasons.update(c["reasons"])
        if dup_moved:
            reasons["duplicate"] += dup_moved
        result.shards.extend(s for s in c["shards"] if s in q_manifest)
        result.quarantine_shards.extend(c["quarantine_shards"])
        result.quarantine_shards.extend(f"{s}-dup" for s in c["shards"] if f"{s}-dup" in x_manifest)
        result.images_stored += c["images_stored"]
        result.images_decoded += c["images_decoded"]
        for key, n in (c.get("cleaned") or {}).items():  # markers written before this field have none
            result.cleaned[key] = result.cleaned.get(key, 0) + n
    result.reasons = dict(sorted(reasons.items()))
    result.seconds = seconds
    storage.write_json(IngestFolder(out).summary, result.to_dict())
    return result


def check_output(out: str) -> None:
    """Fail early, in one line, if ``out`` cannot be written (unreachable endpoint, no bucket, bad path)."""
    storage.ensure_writable(out)


def _duplicate(row: dict[str, Any], first: str) -> dict[str, Any]:
    raw = {k: row[k] for k in ("question_id", "question", "answer") if k in row}
    return quarantine_row(
        source=row["source"],
        input_file=row["input_file"],
        record_index=row["record_index"],
        reason="duplicate",
        detail=f"same question_id {row['question_id']} as {first}",
        raw=raw,
    )


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" records", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


# ------------------------------------------------------------------------------------------
# The bundled demo inputs
# ------------------------------------------------------------------------------------------


def demo_entries(config: str | Path = DEMO_CONFIG) -> list[dict[str, Any]]:
    """The ingest entries of the bundled demo (``sample_data/demo.yaml``), paths made absolute."""
    import yaml

    from octomed_data.config import safe_load_capped

    path = Path(config)
    try:
        doc = safe_load_capped(path.read_text(encoding="utf-8"), f"demo config {path}")
    except FileNotFoundError:
        raise ConfigError(f"demo config not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"demo config {path} is not valid YAML: {exc}") from None
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"demo config {path} has no 'entries' list")
    base = path.parent
    out = []
    for entry in entries:
        entry = dict(entry)
        entry["input"] = str(base / entry["input"])
        if entry.get("images"):
            entry["images"] = str(base / entry["images"])
        out.append(entry)
    return out


__all__ = [
    "IngestResult",
    "demo_entries",
    "SAMPLE_DATA_DIR",
]
