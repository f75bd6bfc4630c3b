"""An arm's training data: the base run's accepted traces, selected without a teacher request.

Streamed shard by shard (the base run's ``filter/accepted``; pass rates from ``filter/verdicts``
of the same shard), written as the arm's own accepted dataset. The arm's **data fingerprint** hashes
exactly which traces were kept (question, sample index, teacher, model, prompt version, sampling
params), so two arms with the same data have the same fingerprint whatever their selections said.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.experiment.spec import SOURCE_GROUPS, Arm
from octomed_data.layout import RunPaths
from octomed_data.rejection import FAILED
from octomed_data.schema import SAMPLE_SCHEMA

KEY_FIELDS = ("question_id", "sample_idx", "teacher", "model", "prompt_version", "params_hash")


@dataclass
class ArmData:
    """What an arm trains on (before the mixture's split): counts, tokens, the fingerprint."""

    uri: str
    fingerprint: str
    traces: int = 0
    questions: int = 0
    completion_tokens: int = 0  # teacher reply tokens of the kept traces (reasoning + answer)
    per_source: dict[str, int] = field(default_factory=dict)
    mean_tokens_by_task: dict[str, float] = field(default_factory=dict)  # trace length per task type

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def base_sources(base: RunPaths) -> set[str]:
    """Every source with accepted traces in the base run (one column read)."""
    ds = storage.Dataset(base.accepted)
    return {
        s for shard in sorted(ds.manifest()) for s in ds.read_shard(shard, ["source"]).column(0).to_pylist()
    }


def source_matcher(arm: Arm, known: set[str]):
    """``row -> bool`` for the arm's sources (names or groups); unknown names are one error line."""
    if arm.sources is None:
        return lambda row: True
    names = {s for s in arm.sources if s not in SOURCE_GROUPS}
    unknown = sorted(names - known)
    if unknown:
        raise ConfigError(
            f"arm {arm.name!r}: source(s) {unknown} have no accepted traces in the base run "
            f"(sources: {sorted(known)}; groups: {sorted(SOURCE_GROUPS)})"
        )
    types = set().union(*(SOURCE_GROUPS[s] for s in arm.sources if s in SOURCE_GROUPS))
    return lambda row: row["source"] in names or row["task_type"] in types


def pass_rates(verdicts: storage.Dataset, shard: str) -> dict[str, float]:
    """Per question of one shard: accepted / judged samples (failed requests are not samples)."""
    judged: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    if verdicts.shard_info(shard) is None:
        return {}
    table = verdicts.read_shard(shard, ["question_id", "correct", "reject_reason"])
    for qid, ok, reason in zip(*(table.column(i).to_pylist() for i in range(3)), strict=True):
        if reason == FAILED:
            continue
        judged[qid] += 1
        correct[qid] += bool(ok)
    return {q: correct[q] / n for q, n in judged.items()}


def _first_k(rows: Iterable[dict[str, Any]], k: int | None) -> list[dict[str, Any]]:
    """Per question, its first ``k`` traces by sample index (so the k=1 arm ⊂ k=4 ⊂ k=16)."""
    by_question: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_question[row["question_id"]].append(row)
    out: list[dict[str, Any]] = []
    for qid in sorted(by_question):
        group = sorted(by_question[qid], key=lambda r: int(r["sample_idx"]))
        out.extend(group if k is None else group[:k])
    return out


def select_arm(base: RunPaths, arm: Arm, out: str) -> ArmData:
    """Write the arm's selection of the base run's accepted traces to ``out``; return its data record."""
    accepted = storage.Dataset(base.accepted)
    shards = sorted(accepted.manifest())
    if not shards:
        raise ConfigError(
            f"the base run {base.run_id!r} has no accepted traces at {base.accepted}: "
            "run its distill and filter stages first"
        )
    keep_source = source_matcher(arm, base_sources(base))
    teachers = set(arm.teachers) if arm.teachers is not None else None
    verdicts = storage.Dataset(base.verdicts)
    dst = storage.Dataset(out, SAMPLE_SCHEMA)
    dst.drop_stale(shards)
    digest = hashlib.sha256()
    data = ArmData(uri=out, fingerprint="")
    per_source: Counter[str] = Counter()
    task_tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for shard in shards:
        rates = pass_rates(verdicts, shard) if arm.pass_rate is not None else {}
        rows = []
        for row in accepted.read_shard(shard).to_pylist():
            if not keep_source(row) or (teachers is not None and row["teacher"] not in teachers):
                continue
            if arm.pass_rate is not None:
                rate = rates.get(row["question_id"])
                if rate is None or not arm.pass_rate[0] <= rate <= arm.pass_rate[1]:
                    continue
            rows.append(row)
        rows = _first_k(rows, arm.samples_per_question)
        dst.write_shard(shard, pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA))
        if rows:
            keys = sorted("|".join(str(r[f]) for f in KEY_FIELDS) for r in rows)
            digest.update(f"{len(keys)}\n".encode() + "\n".join(keys).encode() + b"\n")
        data.questions += len({r["question_id"] for r in rows})  # a question lives in one shard
        for r in rows:
            per_source[r["source"]] += 1
            tokens = int(r.get("completion_tokens") or 0)
            data.completion_tokens += tokens
            task_tokens[r["task_type"]][0] += tokens
            task_tokens[r["task_type"]][1] += 1
        data.traces += len(rows)
    if not data.traces:
        raise ConfigError(f"arm {arm.name!r} selects no trace of the base run {base.run_id!r}")
    data.fingerprint = digest.hexdigest()[:16]
    data.per_source = dict(sorted(per_source.items()))
    data.mean_tokens_by_task = {t: round(s / n, 1) for t, (s, n) in sorted(task_tokens.items()) if n}
    return data
