"""Optional question filtering by pass rate (off by default, as in the paper's final recipe).

The paper's ablation keeps questions that a chosen model answers correctly between ``k`` and
``m`` times out of its N samples. Run ``distill`` with that model into some ``OUT``, then
:func:`filter_by_pass_rate` writes the kept questions as a new questions dataset (same shard
names), streaming one shard at a time.
"""

from __future__ import annotations

from typing import Any

from octomed_data import storage
from octomed_data.distill.engine import raw_uri
from octomed_data.errors import ConfigError
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA

FAILED = "request_failed"


def _correct_counts(out: str, shard: str, teacher: str | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    ds = storage.Dataset(raw_uri(out), SAMPLE_SCHEMA)
    if not ds.is_committed(shard):
        return counts
    cols = ["question_id", "teacher", "correct", "reject_reason"]
    for batch in ds.iter_batches(columns=cols, shards=[shard]):
        for qid, t, ok, reason in zip(*(batch.column(c).to_pylist() for c in cols), strict=True):
            if reason == FAILED or (teacher is not None and t != teacher):
                continue
            counts[qid] = counts.get(qid, 0) + (1 if ok else 0)
    return counts


def filter_by_pass_rate(
    questions_uri: str, out: str, filtered_uri: str, k: int, m: int, *, teacher: str | None = None
) -> dict[str, Any]:
    """Keep questions whose correct-sample count in ``OUT/raw`` lies in ``[k, m]``.

    Questions with no samples in ``OUT/raw`` are dropped and counted as ``not_sampled``.
    """
    if not 0 <= k <= m:
        raise ConfigError(f"pass-rate band needs 0 <= k <= m, got k={k}, m={m}")
    qds = storage.Dataset(questions_uri, QUESTION_SCHEMA)
    dest = storage.Dataset(filtered_uri, QUESTION_SCHEMA)
    kept = dropped = not_sampled = 0
    for shard in qds.manifest():
        counts = _correct_counts(out, shard, teacher)
        rows = []
        for row in qds.iter_rows(shards=[shard]):
            c = counts.get(row["question_id"])
            if c is None:
                not_sampled += 1
            elif k <= c <= m:
                rows.append(row)
            else:
                dropped += 1
        kept += len(rows)
        dest.write_shard(shard, rows, extra={"filter": f"pass_rate[{k},{m}]", "teacher": teacher})
    return {"kept": kept, "dropped": dropped, "not_sampled": not_sampled, "uri": filtered_uri}
