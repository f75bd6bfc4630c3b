"""The training mixture: accepted traces from every source, weighted, capped, deduplicated, shuffled, split.

Input: accepted samples (``SAMPLE_SCHEMA``, the output of rejection sampling) and the questions
they answer (``QUESTION_SCHEMA``, after decontamination). Output: ``OUT/train`` and
``OUT/validation`` datasets of :data:`MIXTURE_SCHEMA` rows (question + one accepted trace),
plus ``OUT/mixture.json`` with per-source counts.

Nothing holds a whole run in memory. The work is three streaming passes over hash buckets:

1. *partition*: samples and questions are spilled to ``OUT/_work`` bucketed by ``question_id``,
   so every trace of a question, and the question itself, land in the same bucket; with more
   buckets than one pass can fill in chunks of a useful size, the spill goes level by level
   (:mod:`octomed_data.mixture_partition`), so the work files grow linearly with the data. The
   pass takes Arrow batches (:mod:`octomed_data.mixture_input`): per trace only its dedupe key
   is Python work, buckets are hashed once per distinct question, and the spill buffers hold Arrow
   tables sized in Arrow bytes; a further level moves Arrow tables, so a level costs I/O, not
   per-row Python work, and the step stays linear in the samples;
2. *select*: per bucket, duplicates (same question + same normalised reasoning and response)
   are dropped, the per-question limit and the per-source weight are applied, and per-source
   caps keep the traces with the smallest seeded priority (a bounded heap per capped source);
3. *shuffle*: selected rows are range-partitioned by a seeded 64-bit key (level by level too;
   a bucket's rows go to the spill as Arrow tables of up to 2,048 rows, their ranges computed in
   numpy) and each partition is sorted, so concatenating the output shards in order is one global
   seeded shuffle.

Every random choice is a hash of (seed, content), so the same inputs and seed give the same
mixture on any machine and with any bucket count. The train/validation split is by
``question_id``: no question is in both. It is stratified by (source, task type): each question's
seeded hash decides, and a stratum with at least two selected questions that the hash left
without a validation (or without a training) question gets its lowest-hash (highest-hash) one
moved over, so validation covers every source and task type that training has.

``exclude_audit_flags`` drops every accepted trace of a question the filter's gold-label audit
flagged (:mod:`octomed_data.audit`: ``suspected_label_error``, ``never_correct``), counted per
source as ``excluded_by_audit`` (traces) and ``questions_excluded_by_audit``. The audit is read
shard by shard beside the accepted shard of the same name (a question's traces are all in one),
so memory stays one shard's flagged ids; a missing or stale audit is a one-line error.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from octomed_data import storage
from octomed_data.errors import ConfigError, StorageError
from octomed_data.layout import SPLITS, MixtureFolder
from octomed_data.mixture_config import MixtureConfig, MixtureResult, SourceCounts, load_result, parse_weights
from octomed_data.mixture_input import (
    audit_uri_beside,
    bucket_hasher,
    correct_only,
    iter_batches,
    iter_unflagged,
    peek_mean_bytes,
)
from octomed_data.mixture_partition import Partition, remove_tree, spill_ranges
from octomed_data.mixture_select import (
    Stratum,
    bucket_candidates,
    dedupe_key,
    h64,
    split_of,
    stratified_moves,
    within_cap,
)
from octomed_data.schema import ACCEPTED_SCHEMA, MIXTURE_SCHEMA, QUESTION_SCHEMA

__all__ = [  # re-exported: the names other modules import from here
    "MIXTURE_SCHEMA", "SPLITS", "MixtureConfig", "MixtureResult", "SourceCounts", "audit_uri_beside",
    "build_mixture", "load_result", "parse_weights",
]  # fmt: skip

_SAMPLE_COLUMNS = [
    "question_id",
    "source",
    "task_type",
    "sample_idx",
    "teacher",
    "model",
    "reasoning",
    "response",
    "extracted_answer",
    "correct",
    # The verifier's provenance (accepted rows made before it was carried read as nulls).
    "verifier",
    "verifier_rule",
    "judge_correct",
]
_QUESTION_COLUMNS = [
    "question_id",
    "source",
    "task_type",
    "modality",
    "question",
    "options",
    "images",
    "answer",
    "answer_text",
]
_WORK_SAMPLE_SCHEMA = pa.schema(
    [ACCEPTED_SCHEMA.field(c) for c in _SAMPLE_COLUMNS if c != "correct"]
    + [pa.field("dedupe_key", pa.string(), nullable=False)]
)
_WORK_QUESTION_SCHEMA = pa.schema([QUESTION_SCHEMA.field(c) for c in _QUESTION_COLUMNS])
_PENDING_ROWS = 2048  # mixture rows made into one Arrow table on their way to the shuffle spill


def _as_list(uris: str | Sequence[str]) -> list[str]:
    return [uris] if isinstance(uris, str) else list(uris)


def _count_rows(uris: Iterable[str]) -> int:
    return sum(storage.Dataset(u).num_rows() for u in uris)


def build_mixture(
    accepted: str | Sequence[str],
    questions: str | Sequence[str],
    out: str,
    config: MixtureConfig | None = None,
    *,
    audit: str | Sequence[str] | None = None,
    progress: bool = False,
) -> MixtureResult:
    """Build the mixture from accepted-sample and question datasets into ``out``.

    Re-running with the same inputs replaces the previous mixture at ``out`` (same rows, same order).
    ``audit``: the gold-label audit dataset of each ``accepted`` dataset, read only when
    ``config.exclude_audit_flags`` is set (default: ``audit`` beside each ``accepted``).
    """
    from tqdm import tqdm

    config = config or MixtureConfig()
    t0 = time.time()
    accepted_uris, question_uris = _as_list(accepted), _as_list(questions)
    for uri in accepted_uris + question_uris:
        if not storage.Dataset(uri).has_committed():
            if not storage.exists(uri):
                raise StorageError(f"mixture input not found: {uri}")
    storage.ensure_writable(out)
    folder = MixtureFolder(out)
    work = folder.work
    remove_tree(work)
    flags = list(dict.fromkeys(config.exclude_audit_flags))
    audit_uris = _as_list(audit) if audit is not None else [audit_uri_beside(u) for u in accepted_uris]
    if flags and len(audit_uris) != len(accepted_uris):
        raise ConfigError(f"{len(accepted_uris)} accepted dataset(s) but {len(audit_uris)} audit dataset(s)")
    n_samples = _count_rows(accepted_uris)
    n_questions = _count_rows(question_uris)
    # Memory: a quarter of memory_mb for the spill buffers, a quarter for one work bucket (its
    # samples and questions as Python rows), half for one output partition (read and sorted in
    # Arrow, two copies). Bucket and partition counts follow from the rows' measured sizes.
    budget = config.memory_mb * 2**20
    counts: dict[str, SourceCounts] = defaultdict(SourceCounts)
    if flags:
        batches = iter_unflagged(accepted_uris, audit_uris, flags, _SAMPLE_COLUMNS, counts)
    else:
        batches = iter_batches(accepted_uris, _SAMPLE_COLUMNS)
    batches, sample_bytes = peek_mean_bytes(batches)
    question_batches, question_bytes = peek_mean_bytes(iter_batches(question_uris, _QUESTION_COLUMNS))
    n_buckets = max(
        1,
        math.ceil(n_samples / config.bucket_rows) if config.bucket_rows else 1,
        math.ceil((n_samples * sample_bytes + n_questions * question_bytes) / (budget / 4)),
    )
    spill_limit = budget // 4  # Arrow bytes; one partition buffers at a time (the splits share it)

    # Pass 1: partition samples and questions by question_id, a batch at a time.
    question_bucket = bucket_hasher(n_buckets)
    sample_spill = Partition(
        folder.spill("samples"), _WORK_SAMPLE_SCHEMA, n_buckets, spill_limit, question_bucket
    )
    bar = tqdm(total=n_samples, desc="mixture: partition", disable=not progress, unit="trace")
    for batch in batches:
        bar.update(batch.num_rows)
        table = correct_only(batch)  # only accepted traces enter a mixture, whatever dataset we were given
        for src, n in Counter(table.column("source").to_pylist()).items():
            counts[src].accepted += n
        texts = (table.column(c).to_pylist() for c in ("question_id", "reasoning", "response"))
        keys = [dedupe_key(q, a, r) for q, a, r in zip(*texts, strict=True)]
        table = table.append_column("dedupe_key", pa.array(keys, pa.string()))
        sample_spill.add_table(question_bucket(table), table)
    bar.close()
    sample_spill.finish()
    question_spill = Partition(
        folder.spill("questions"), _WORK_QUESTION_SCHEMA, n_buckets, spill_limit, question_bucket
    )
    answered = np.array(sorted(sample_spill.shards), dtype=np.int64)
    for batch in question_batches:
        table = pa.Table.from_batches([batch])
        buckets = question_bucket(table)
        needed = np.isin(buckets, answered)  # a question nobody answered correctly is not needed
        question_spill.add_table(buckets[needed], table.filter(pa.array(needed)))
    question_spill.finish()
    samples_ds = storage.Dataset(folder.spill("samples"))
    questions_ds = storage.Dataset(folder.spill("questions"))

    # Pass 2a: per-source caps need the global k smallest priorities: a bounded heap per capped
    # source. The same pass counts the rows each split will get, which sizes the output shards.
    # The same pass gathers per-stratum split statistics (O(strata) memory) for the stratified split.
    heaps: dict[str, list[tuple[float, int, str, str, str]]] = defaultdict(list)
    capped = set(config.caps)
    expected: Counter[str] = Counter()
    strata: dict[tuple[str, str], Stratum] = defaultdict(Stratum)
    for bucket in sorted(sample_spill.shards):
        bucket_rows = list(samples_ds.iter_rows(shards=sample_spill.shards[bucket]))
        scratch: dict[str, SourceCounts] = defaultdict(SourceCounts)
        seen_here: set[str] = set()  # every trace of a question is in this bucket
        for row, priority, n in bucket_candidates(bucket_rows, config, scratch):
            src = row["source"]
            split = split_of(row["question_id"], config.seed, config.validation_fraction)
            if src not in capped:
                expected[split] += n
                if row["question_id"] not in seen_here:
                    seen_here.add(row["question_id"])
                    strata[(src, row["task_type"])].add(row["question_id"], split, config.seed)
                continue
            heap = heaps[src]  # max-heap by negated priority: keeps the cap smallest priorities
            item = (-priority, n, split, row["question_id"], row["task_type"])
            if len(heap) < config.caps[src]:
                heapq.heappush(heap, item)
            elif heap and item[0] > heap[0][0]:
                heapq.heapreplace(heap, item)
    threshold = {s: (-heaps[s][0][0] if len(heaps[s]) >= config.caps[s] > 0 else 1.0) for s in capped}
    for src, heap in heaps.items():
        seen_capped: set[str] = set()  # bounded by the cap
        for _, n, split, question_id, task_type in heap:
            expected[split] += n
            if question_id not in seen_capped:
                seen_capped.add(question_id)
                strata[(src, task_type)].add(question_id, split, config.seed)
    moves = stratified_moves(strata) if config.stratify_validation and config.validation_fraction > 0 else {}
    del strata
    out_bytes = 2 * (
        sample_bytes + question_bytes
    )  # a mixture row is a trace + its question, read and sorted
    # Output shards: at most shard_rows rows and half the budget each. The shuffle spills into
    # fewer, coarser ranges, bounded by bytes alone (each a run of whole output shards): a spill
    # writes one chunk per range it buffered rows of, so ranges in step with shard_rows would make
    # the chunks grow with rows x rows.
    n_spill = {s: max(1, math.ceil(expected[s] * out_bytes / (budget / 2))) for s in SPLITS}
    n_out = {s: max(n_spill[s], math.ceil(expected[s] / config.shard_rows)) for s in SPLITS}

    # Pass 2b: select, join with the question, assign split and shuffle key, range-partition.
    def range_of(split: str) -> Callable[[pa.Table], np.ndarray]:
        def bucket_of(table: pa.Table) -> np.ndarray:
            keys = table.column("shuffle_key").to_numpy()
            return spill_ranges(keys, n_out[split], n_spill[split])

        return bucket_of

    # The two splits buffer at once: each gets the spill budget in proportion to its rows, so the
    # larger writes fewer, larger chunks (a chunk's fixed cost would otherwise grow with the ranges).
    total = max(1, sum(expected[s] for s in SPLITS))
    limit = {s: max(budget // 64, spill_limit * expected[s] // total) for s in SPLITS}
    shuffle_spills = {
        s: Partition(folder.spill(f"shuffle-{s}"), MIXTURE_SCHEMA, n_spill[s], limit[s], range_of(s))
        for s in SPLITS
    }
    questions_by_split: dict[str, set[str]] = {s: set() for s in SPLITS}
    q_counts: Counter[str] = Counter()
    pending: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}  # rows on their way to a spill

    def spill_pending(split: str) -> None:  # one Arrow table, its ranges computed at once
        if pending[split]:
            table = pa.Table.from_pylist(pending[split], schema=MIXTURE_SCHEMA)
            shuffle_spills[split].add_table(range_of(split)(table), table)
            pending[split] = []

    for bucket in tqdm(sorted(sample_spill.shards), desc="mixture: select", disable=not progress):
        bucket_rows = list(samples_ds.iter_rows(shards=sample_spill.shards[bucket]))
        qshards = question_spill.shards.get(bucket, [])
        qrows = {q["question_id"]: q for q in questions_ds.iter_rows(shards=qshards)} if qshards else {}
        for row, priority, n in bucket_candidates(bucket_rows, config, counts):
            src = row["source"]
            if src in capped and not within_cap(config.caps[src], priority, threshold[src]):
                counts[src].dropped_by_cap += 1
                continue
            q = qrows.get(row["question_id"])
            if q is None:
                counts[src].missing_question += 1
                continue
            split = moves.get(row["question_id"]) or split_of(
                row["question_id"], config.seed, config.validation_fraction
            )
            counts[src].selected += 1
            if row["question_id"] not in questions_by_split[split]:
                questions_by_split[split].add(row["question_id"])
                q_counts[split] += 1
            for copy in range(n):
                key = h64(config.seed, "order", row["dedupe_key"], copy)
                out_row = {
                    "question_id": row["question_id"],
                    "source": src,
                    "task_type": row["task_type"],
                    "split": split,
                    "modality": q["modality"],
                    "question": q["question"],
                    "options": q["options"],
                    "images": q["images"],
                    "gold_answer": q["answer"],
                    "answer_text": q["answer_text"],
                    "sample_idx": row["sample_idx"],
                    "teacher": row["teacher"],
                    "model": row["model"],
                    "reasoning": row["reasoning"],
                    "response": row["response"],
                    "extracted_answer": row["extracted_answer"],
                    "verifier": row.get("verifier"),
                    "verifier_rule": row.get("verifier_rule"),
                    "judge_correct": row.get("judge_correct"),
                    "copy": copy,
                    "shuffle_key": key,
                }
                pending[split].append(out_row)
                if len(pending[split]) >= _PENDING_ROWS:
                    spill_pending(split)
                if split == "train":
                    counts[src].rows_train += 1
                else:
                    counts[src].rows_validation += 1
        # The set of ids per split is only needed for counting questions; keep it per bucket.
        questions_by_split = {s: set() for s in SPLITS}
        for split in SPLITS:  # the rows of one bucket at most: they hold its strings
            spill_pending(split)
    for split, spill in shuffle_spills.items():
        spill_pending(split)
        spill.finish()

    # Pass 3: sort each spilled range by its key and cut it into its output shards (output shard p
    # holds the keys k with k * n_out // 2**64 == p); shard order = global shuffle order.
    rows_out: Counter[str] = Counter()
    for split in SPLITS:
        target = storage.Dataset(MixtureFolder(out).split(split), MIXTURE_SCHEMA)
        target.drop_stale(keep=[])  # a rebuilt mixture replaces, never mixes, the earlier one
        spill = shuffle_spills[split]
        src_ds = storage.Dataset(spill.uri)
        part = 0
        for spilled in range(n_spill[split]):
            names = spill.shards.get(spilled, [])
            if names:
                table = pa.concat_tables([src_ds.read_shard(n) for n in names])
                table = table.sort_by("shuffle_key")
            else:
                table = MIXTURE_SCHEMA.empty_table()
            keys = table.column("shuffle_key").to_numpy()
            start = 0
            while part < n_out[split] and part * n_spill[split] // n_out[split] == spilled:
                # the first key of the next output shard: the smallest k with k * n_out >= (part + 1) * 2**64
                bound = -(-(part + 1) * 2**64 // n_out[split])
                end = len(keys) if bound >= 2**64 else int(np.searchsorted(keys, np.uint64(bound)))
                target.write_shard(part, table.slice(start, end - start))
                rows_out[split] += end - start
                start, part = end, part + 1
    remove_tree(work)

    result = MixtureResult(
        uri=out,
        train_uri=MixtureFolder(out).split("train"),
        validation_uri=MixtureFolder(out).split("validation"),
        rows_train=rows_out["train"],
        rows_validation=rows_out["validation"],
        questions_train=q_counts["train"],
        questions_validation=q_counts["validation"],
        sources=dict(sorted(counts.items())),
        stratified_moves=len(moves),
        seconds=round(time.time() - t0, 3),
    )
    storage.write_json(
        folder.summary,
        {
            "config": config.model_dump(),
            "inputs": {"accepted": accepted_uris, "questions": question_uris}
            | ({"audit": audit_uris} if flags else {}),
        }
        | result.to_dict(),
    )
    return result
